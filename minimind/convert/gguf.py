"""Export a dense MiniMind model directory as one GGUF file for llama.cpp (architecture `llama`).

    minimind convert runs/sft --to gguf --out runs/sft.gguf --dtype q8_0

The file holds the weights, the model's shape, and the tokenizer (byte-level BPE as llama.cpp's `gpt2`
tokenizer model, its merges, special-token ids and the chat template), so `llama-cli -m FILE.gguf` needs
nothing else. llama.cpp's `llama` architecture applies RoPE to interleaved pairs (2i, 2i+1), so the q/k
projection rows are permuted from our rotate-half order (see `layout.py`). The output head is tied to the
embedding and omitted: llama.cpp falls back to `token_embd` when `output.weight` is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from minimind.convert.layout import rotate_half_to_interleaved
from minimind.errors import UserError
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.hub import load_model_dir

GGUF_DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # Q8_0 quantises rows in blocks of 32 values; other rows fall back to f16

# our parameter name inside a block -> llama.cpp's tensor name
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensor_names(config: MiniMindConfig) -> dict[str, str]:
    """Our state-dict key -> GGUF tensor name, in the order the file stores them."""
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    for i in range(config.n_layers):
        for ours, theirs in BLOCK_TENSORS.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    names["model.norm.weight"] = "output_norm.weight"
    return names


def to_gguf_layout(key: str, tensor: torch.Tensor, config: MiniMindConfig) -> np.ndarray:
    """Our fp32 tensor as llama.cpp expects its values (q/k rows in interleaved RoPE order)."""
    if key.endswith("q_proj.weight"):
        tensor = rotate_half_to_interleaved(tensor, config.n_heads)
    elif key.endswith("k_proj.weight"):
        tensor = rotate_half_to_interleaved(tensor, config.n_kv_heads)
    return tensor.detach().float().numpy()


def encode_tensor(values: np.ndarray, dtype: str):
    """-> (array to write, its GGML type). Norm vectors stay f32 in every mode, as llama.cpp expects."""
    import gguf

    if dtype == "f32" or values.ndim == 1:
        return values.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and values.shape[-1] % Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(values, q8), q8
    return values.astype(np.float16), gguf.GGMLQuantizationType.F16


def tokenizer_metadata(model_dir: Path, tokenizer, vocab_size: int) -> dict:
    """Tokens, token types, merges and the pre-tokenizer name llama.cpp's BPE needs, from tokenizer.json."""
    import gguf

    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(
            f"{path}: field 'model' must be a byte-level BPE without byte_fallback for GGUF export"
        )
    if data.get("normalizer") is not None:
        raise UserError(
            f"{path}: field 'normalizer' must be null; llama.cpp's gpt2 tokenizer has no normalizer"
        )
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise UserError(
            f"{path}: field 'pre_tokenizer' must be ByteLevel with use_regex (GPT-2's split), "
            f"got {pre.get('type')!r}"
        )
    tokens: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise UserError(f"{path}: token id {max(tokens)} does not fit the model's vocab_size {vocab_size}")
    # llama.cpp sizes its vocabulary by the token list, which must cover every embedding row.
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokens": token_list,
        "types": type_list,
        "merges": merges,
        "chat_template": tokenizer.chat_template,
    }


def export_gguf(model_dir: str | Path, out_file: str | Path, dtype: str = "f16") -> Path:
    """Write `model_dir` as a GGUF file (`dtype` f32, f16 or q8_0 for the matrices)."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    model, tokenizer = load_model_dir(model_dir, dtype=torch.float32)
    config = model.config
    if config.use_moe:
        raise UserError(
            "config field 'use_moe' is true: GGUF export writes the dense llama architecture only; for an "
            "MoE model use --to llama, which writes an exact Qwen2-MoE directory"
        )
    vocab = tokenizer_metadata(model_dir, tokenizer, config.vocab_size)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")  # renamed into place only when complete
    try:
        _write(gguf.GGUFWriter(str(partial), "llama"), model, tokenizer, vocab, model_dir, dtype)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file


def _write(writer, model, tokenizer, vocab: dict, model_dir: Path, dtype: str) -> None:
    import gguf

    config = model.config
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_shape(writer, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # our chat template writes <s> itself
    writer.add_add_eos_token(False)
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
    state = model.state_dict()
    for key, name in gguf_tensor_names(config).items():
        values, ggml_type = encode_tensor(to_gguf_layout(key, state[key], config), dtype)
        writer.add_tensor(name, values, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_shape(writer, config: MiniMindConfig) -> None:
    """Hyperparameters under the `llama.` prefix, YaRN included when the model uses it."""
    import gguf

    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.yarn_factor > 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(config.yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(config.yarn_original_max_seq_len or config.max_seq_len)
        writer.add_rope_scaling_yarn_beta_fast(config.yarn_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(config.yarn_beta_slow)
