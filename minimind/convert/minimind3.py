"""Import minimind-3 weights (a `.pth` or its transformers-format directory) and Qwen3 / Qwen3-MoE directories
into a model directory, and export back to a minimind-3 `.pth`.

    minimind convert minimind-3/ --from minimind3 --out runs/minimind3          # config.json + weights + tokenizer
    minimind convert full_sft_768.pth --from minimind3 --tokenizer TOKDIR --out runs/minimind3
    minimind convert Qwen3-0.6B/ --from qwen3 --out runs/qwen3-0.6b
    minimind convert runs/minimind3 --to minimind3 --out full_sft_768.pth

Today's MiniMind (minimind-3) names its weights as Qwen3 does, and those are our names: the QK-norm
(`self_attn.q_norm` / `k_norm`, one RMSNorm of size head_dim each), rotate-half RoPE, routed experts as
`mlp.experts.{e}.gate_proj/up_proj/down_proj` with the router at `mlp.gate`, no shared expert, the output head
tied to the embedding. So an import checks every key and shape and copies the numbers; nothing is permuted.

The tensors give every shape: head_dim is the length of `q_norm`, the head counts are the q/k projection rows
over head_dim, the experts are the router's rows, the FFN widths are `gate_proj`'s rows. What they cannot tell
(experts per token, rope_theta, norm epsilon, context length, YaRN) comes from config.json, whose shape fields
must agree with the tensors; a bare `.pth` gets minimind-3's defaults (top-1, θ 1e6, eps 1e-6, 32768 positions),
and `--experts-per-tok` overrides the experts per token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.convert.layout import check_output_dir, stored_dtype
from minimind.convert.minimind2 import (
    LAYER_INDEX,
    load_hf_dir,
    load_pth,
    load_source_tokenizer,
    save_imported,
    to_our_state,
    write_pth,
)
from minimind.errors import UserError
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.modeldir import load_model

# minimind-3's own defaults (its MiniMindConfig), for what a bare `.pth` cannot say
MINIMIND3_DEFAULTS = dict(rope_theta=1e6, norm_eps=1e-6, max_seq_len=32768, num_experts_per_tok=1,
                          norm_topk_prob=True, aux_loss_alpha=5e-4)
# config.json field (minimind-3 and Qwen3 share the names) -> our MiniMindConfig field
HF_FIELDS = {
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_seq_len",
    "num_experts_per_tok": "num_experts_per_tok",
    "norm_topk_prob": "norm_topk_prob",
    "router_aux_loss_coef": "aux_loss_alpha",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
# --from format -> the config.json model_type values it reads
MODEL_TYPES = {"minimind3": ("minimind",), "qwen3": ("qwen3", "qwen3_moe")}


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 keeps a layer's experts fused in memory (`mlp.experts.gate_up_proj` (E, 2·I, dim),
    `mlp.experts.down_proj` (E, dim, I)); a state dict saved from there becomes the per-expert layout."""
    out = {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".")
        if prefix.endswith("mlp.experts") and name in ("gate_up_proj", "down_proj") and tensor.ndim == 3:
            for e, expert in enumerate(tensor):
                if name == "down_proj":
                    out[f"{prefix}.{e}.down_proj.weight"] = expert
                else:
                    gate, up = expert.chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        else:
            out[key] = tensor
    return out


def tensor_shapes(state: dict[str, torch.Tensor], path: str | Path) -> dict:
    """Every size the tensors tell, as MiniMindConfig fields (head_dim from q_norm's length, and so on)."""

    def rows(key: str) -> int:
        if key not in state:
            raise UserError(f"{path}: missing key '{key}'")
        return state[key].shape[0]

    if "tok_embeddings.weight" in state:
        raise UserError(f"{path}: MiniMind2's layout (tok_embeddings.weight), not minimind-3's; use --from minimind2")
    vocab_size = rows("model.embed_tokens.weight")
    dim = state["model.embed_tokens.weight"].shape[-1]
    q_norm, q_proj, k_proj = (f"model.layers.0.self_attn.{name}.weight" for name in ("q_norm", "q_proj", "k_proj"))
    if q_norm not in state and q_proj in state:
        raise UserError(f"{path}: no '{q_norm}' (QK-norm): a MiniMind2-style checkpoint, not minimind-3; use "
                        "--from minimind2")
    head_dim = rows(q_norm)
    for key in (q_proj, k_proj):
        if rows(key) % head_dim:
            raise UserError(f"{path}: '{key}' has {rows(key)} rows, not a multiple of head_dim {head_dim} (the "
                            f"length of '{q_norm}')")
    fields = dict(vocab_size=vocab_size, dim=dim, head_dim=head_dim, n_heads=rows(q_proj) // head_dim,
                  n_kv_heads=rows(k_proj) // head_dim, qk_norm=True, tie_word_embeddings=True)
    fields["n_layers"] = 1 + max(int(m.group(1)) for k in state if (m := LAYER_INDEX.match(k)))
    if "model.layers.0.mlp.gate.weight" in state:
        width = rows("model.layers.0.mlp.experts.0.gate_proj.weight")
        fields |= dict(use_moe=True, n_routed_experts=rows("model.layers.0.mlp.gate.weight"), n_shared_experts=0,
                       moe_intermediate_size=width, hidden_dim=width, norm_top1_prob=True)
    else:
        fields["hidden_dim"] = rows("model.layers.0.mlp.gate_proj.weight")
    return fields


def config_json_fields(hf: dict, shapes: dict, config_file: Path) -> dict:
    """The fields config.json adds to the tensors' shapes, after checking that its own shape fields agree."""
    hf = dict(hf)
    if "num_local_experts" in hf:  # transformers 5's name for num_experts
        hf.setdefault("num_experts", hf["num_local_experts"])
    agree = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
             "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim", "vocab_size": "vocab_size"}
    if shapes.get("use_moe"):
        agree |= {"num_experts": "n_routed_experts", "moe_intermediate_size": "moe_intermediate_size"}
    else:
        agree["intermediate_size"] = "hidden_dim"
    for theirs, ours in agree.items():
        if hf.get(theirs) is not None and hf[theirs] != shapes[ours]:
            raise UserError(f"{config_file}: field '{theirs}' is {hf[theirs]!r} but the weights give {shapes[ours]}")
    if bool(hf.get("use_moe", shapes.get("use_moe", False))) != bool(shapes.get("use_moe")):
        raise UserError(f"{config_file}: field 'use_moe' is {hf['use_moe']!r} but the weights "
                        f"{'have' if shapes.get('use_moe') else 'have no'} router 'mlp.gate'")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{config_file}: field 'hidden_act' is {hf['hidden_act']!r}, expected 'silu'")
    if hf.get("tie_word_embeddings") is False:
        raise UserError(f"{config_file}: field 'tie_word_embeddings' is false; MiniMind ties the output head to "
                        "the embedding, so untied models cannot be imported")
    if hf.get("attention_bias"):
        raise UserError(f"{config_file}: field 'attention_bias' is true; MiniMind's projections have no biases")
    if hf.get("use_sliding_window"):
        raise UserError(f"{config_file}: field 'use_sliding_window' is true; MiniMind attends to every position")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise UserError(f"{config_file}: some layers are dense (fields 'mlp_only_layers', 'decoder_sparse_step'); "
                        "MiniMind's MoE models route in every layer")
    fields = {ours: hf[theirs] for theirs, ours in HF_FIELDS.items() if hf.get(theirs) is not None}
    if shapes.get("use_moe") and hf.get("intermediate_size") is not None:
        fields["hidden_dim"] = hf["intermediate_size"]  # the dense width (used by no layer without shared experts)
    rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        fields["rope_theta"] = theta
    return fields | yarn_fields(hf.get("rope_scaling") or rope, config_file)


def yarn_fields(scaling: dict, config_file: Path) -> dict:
    """Our YaRN fields from config.json's `rope_scaling` / `rope_parameters` (None or a YaRN dict)."""
    if not isinstance(scaling, dict):
        raise UserError(f"{config_file}: field 'rope_scaling' must be null or an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind != "yarn":
        raise UserError(f"{config_file}: RoPE scaling {kind!r} is not supported (expected none or 'yarn')")
    attention = scaling.get("attention_factor")
    try:
        return dict(yarn_factor=float(scaling.get("factor", 1.0)),
                    yarn_original_max_seq_len=scaling.get("original_max_position_embeddings"),
                    yarn_beta_fast=float(scaling.get("beta_fast", 32.0)),
                    yarn_beta_slow=float(scaling.get("beta_slow", 1.0)),
                    yarn_attention_factor=None if attention is None else float(attention))
    except (TypeError, ValueError):
        raise UserError(f"{config_file}: the YaRN settings {scaling!r} are not numbers") from None


def qk_norm_config(
    state: dict[str, torch.Tensor],
    path: str | Path,
    hf: dict | None = None,
    experts_per_tok: int | None = None,
    token_ids: dict | None = None,
) -> MiniMindConfig:
    """The config of a Qwen3-layout state dict: shapes from the tensors, the rest from config.json `hf` (or
    minimind-3's defaults), the experts per token from `experts_per_tok` when given, special token ids from
    config.json or else `token_ids` (the tokenizer's)."""
    shapes = tensor_shapes(state, path)
    fields = {**MINIMIND3_DEFAULTS, **(token_ids or {}), **shapes}
    if hf is not None:
        fields |= config_json_fields(hf, shapes, Path(path) / "config.json")
    if experts_per_tok is not None:
        fields["num_experts_per_tok"] = experts_per_tok
    if not fields.get("use_moe"):
        fields = {k: v for k, v in fields.items() if k not in ("num_experts_per_tok", "aux_loss_alpha")}
    try:
        return MiniMindConfig(**fields)
    except ValueError as err:
        raise UserError(f"{path}: the shapes give an invalid config: {err}") from None


def import_qk_norm(
    source: str | Path, tokenizer_dir: str | Path | None, out_dir: str | Path, source_format: str = "minimind3",
    experts_per_tok: int | None = None,
) -> MiniMindConfig:
    """Write a model directory at `out_dir` from a Qwen3-layout `.pth` (with `tokenizer_dir`) or transformers
    directory (its tokenizer unless `tokenizer_dir` is given); weights keep their dtype. `source_format` is
    "minimind3" (a released minimind-3 directory) or "qwen3" (Qwen3ForCausalLM / Qwen3MoeForCausalLM)."""
    source = Path(source)
    if source.is_dir():
        state, hf = load_hf_dir(source, MODEL_TYPES[source_format])
        tokenizer_dir = tokenizer_dir or source
    elif tokenizer_dir is None:
        raise UserError(f"--from {source_format} needs --tokenizer DIR for a .pth (a .pth holds no tokenizer)")
    else:
        state, hf = load_pth(source), None
    out_dir = check_output_dir(out_dir)
    state = unfuse_experts(state)
    tokenizer = load_source_tokenizer(tokenizer_dir)
    # the special ids config.json leaves out (transformers 5 writes null) are the tokenizer's
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    config = qk_norm_config(state, source, hf, experts_per_tok, {k: v for k, v in ids.items() if v is not None})
    save_imported(to_our_state(state, config, source), config, tokenizer, out_dir)
    return config


def import_minimind3(
    source: str | Path, tokenizer_dir: str | Path | None, out_dir: str | Path, experts_per_tok: int | None = None
) -> MiniMindConfig:
    """`minimind convert SOURCE --from minimind3`: a minimind-3 `.pth` or released transformers directory."""
    return import_qk_norm(source, tokenizer_dir, out_dir, "minimind3", experts_per_tok)


def import_qwen3(source: str | Path, tokenizer_dir: str | Path | None, out_dir: str | Path) -> MiniMindConfig:
    """`minimind convert SOURCE --from qwen3`: a Qwen3ForCausalLM / Qwen3MoeForCausalLM transformers directory
    (tied embeddings, no attention bias, no sliding window, every layer MoE for Qwen3-MoE)."""
    return import_qk_norm(source, tokenizer_dir, out_dir, "qwen3")


def require_minimind3_shape(config: MiniMindConfig, target: str) -> None:
    """Refuse a model the Qwen3 architectures cannot hold: no QK-norm, or shared experts."""
    if not config.qk_norm:
        raise UserError(f"config field 'qk_norm' is false: --to {target} holds QK-norm models only; use --to llama "
                        "(or --to minimind2 for a .pth)")
    if config.use_moe and config.n_shared_experts:
        raise UserError(f"config field 'n_shared_experts' is {config.n_shared_experts}: --to {target} holds routed "
                        "experts only; use --to llama (Qwen2-MoE)")


def to_minimind3_state(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights as minimind-3's `state_dict()` has them: the same names, `lm_head.weight` included, fp16 (its
    training scripts save `{k: v.half()}`)."""
    return {key: tensor.detach().half().contiguous().clone() for key, tensor in model.state_dict().items()}


def export_minimind3(model_dir: str | Path, out_file: str | Path) -> Path:
    """Write `model_dir` as the `.pth` state dict minimind-3's scripts load (fp16, its parameter names)."""
    model = load_model(model_dir, dtype=stored_dtype(model_dir))
    require_minimind3_shape(model.config, "minimind3")
    return write_pth(to_minimind3_state(model), out_file)
