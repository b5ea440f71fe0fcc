"""Export a dense MiniMind model directory as a plain HF `LlamaForCausalLM` directory (no remote code).

    minimind convert runs/sft --to llama --out runs/sft-llama

Our parameter names are already Llama's and our RoPE is Llama's rotate-half, so the weights are copied as
they are (minus the tied `lm_head.weight`, which HF re-ties on load); the work is the config. The config
names RoPE both ways: `rope_parameters` (transformers >= 5) and `rope_theta`/`rope_scaling` (older
transformers, vLLM, llama.cpp's converter), so every reader finds what it looks for. An MoE model is
written as Qwen2-MoE instead (see `qwen2_moe.py` for why that is exact).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from minimind.convert.layout import copy_tokenizer, stored_dtype, write_directory
from minimind.errors import UserError
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.modeldir import load_model

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def rope_fields(config: MiniMindConfig) -> dict:
    """RoPE settings in the new (`rope_parameters`) and the legacy (`rope_theta`, `rope_scaling`) forms."""
    fields: dict = {"rope_theta": config.rope_theta}
    if config.yarn_factor > 1.0:
        yarn = {
            "rope_type": "yarn",
            "factor": config.yarn_factor,
            "original_max_position_embeddings": config.yarn_original_max_seq_len or config.max_seq_len,
            "beta_fast": config.yarn_beta_fast,
            "beta_slow": config.yarn_beta_slow,
        }
        if config.yarn_attention_factor is not None:
            yarn["attention_factor"] = config.yarn_attention_factor
        fields["rope_scaling"] = dict(yarn)
        fields["rope_parameters"] = {**yarn, "rope_theta": config.rope_theta}
    else:
        fields["rope_scaling"] = None
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    return fields


def common_hf_config(config: MiniMindConfig, dtype: torch.dtype) -> dict:
    """The decoder fields every Llama-family config shares, in HF's names."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        **rope_fields(config),
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": DTYPE_NAMES[dtype],
    }


def llama_config(config: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of the equivalent `LlamaForCausalLM`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common_hf_config(config, dtype),
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


def write_hf_model(
    out_dir: Path, config_json: dict, state: dict[str, torch.Tensor], source_dir: Path
) -> None:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files into `out_dir`."""
    from safetensors.torch import save_file

    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    # Tensors must own their memory: safetensors refuses views that share storage (the tied embedding).
    save_file(
        {k: v.detach().contiguous().clone() for k, v in state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    generation = source_dir / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out_dir / "generation_config.json")
    else:
        ids = {k: config_json[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out_dir / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    copy_tokenizer(source_dir, out_dir)


def export_llama(model_dir: str | Path, out_dir: str | Path) -> str:
    """Write `model_dir` as a plain HF directory at `out_dir`; returns the architecture written.

    Dense models become `LlamaForCausalLM`, MoE models `Qwen2MoeForCausalLM`. Weights keep the dtype they
    were saved in.
    """

    def describe(model: MiniMindForCausalLM, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
        if model.config.qk_norm:
            raise UserError(f"{model_dir}: config field 'qk_norm' is true; Llama and Qwen2-MoE have no QK-norm, "
                            "use --to qwen3")
        if model.config.use_moe:
            from minimind.convert.qwen2_moe import qwen2_moe_config, qwen2_moe_state_dict

            return qwen2_moe_config(model.config, dtype), qwen2_moe_state_dict(model)
        return llama_config(model.config, dtype), untied_state(model)

    return export_hf(model_dir, out_dir, describe)


def untied_state(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Our state dict without the tied `lm_head.weight` (HF re-ties it on load from `tie_word_embeddings`)."""
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def export_hf(
    model_dir: str | Path,
    out_dir: str | Path,
    describe: Callable[[MiniMindForCausalLM, torch.dtype], tuple[dict, dict[str, torch.Tensor]]],
) -> str:
    """Load `model_dir` in its saved dtype, let `describe` give (config.json, state dict), write the directory at
    `out_dir` with the tokenizer; returns the architecture written."""
    model_dir = Path(model_dir)
    dtype = stored_dtype(model_dir)
    model = load_model(model_dir, dtype=dtype)
    config_json, state = describe(model, dtype)
    write_directory(out_dir, lambda staging: write_hf_model(staging, config_json, state, model_dir))
    return config_json["architectures"][0]
