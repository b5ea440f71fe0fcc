"""Export a MiniMind model directory as one GGUF file for llama.cpp, with an Ollama Modelfile beside it.

    minimind convert runs/sft --to gguf --out runs/sft.gguf --dtype q8_0    # or f32, f16, q4_0

The architecture follows the model: `llama` for our dense models, `qwen3` for dense QK-norm models (minimind-3)
and `qwen3moe` for QK-norm models with routed experts only (minimind-3-moe). The file holds the weights, the
model's shape, and the tokenizer (byte-level BPE as llama.cpp's `gpt2` tokenizer model, its merges,
special-token ids and the chat template), so `llama-cli -m FILE.gguf` needs nothing else; the `Modelfile`
(ollama.py) makes it `ollama create NAME -f Modelfile` ready. llama.cpp's `llama` architecture applies RoPE to
interleaved pairs (2i, 2i+1), so for it the q/k projection rows are permuted from our rotate-half order (see
`layout.py`); `qwen3`/`qwen3moe` rotate halves (llama.cpp's NEOX RoPE), as we do, and take the rows as they
are. The output head is tied to the embedding and omitted: llama.cpp falls back to `token_embd` when
`output.weight` is absent.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from minimind.convert.layout import rotate_half_to_interleaved
from minimind.convert.ollama import write_modelfile
from minimind.errors import UserError, install_hint
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.layers import rope_frequencies
from minimind.modeldir import load_model_dir

GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0 quantise rows in blocks of 32 values; other rows fall back to f16

# our parameter name inside a block -> llama.cpp's tensor (a `gguf.MODEL_TENSOR` member)
BLOCK_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.k_norm": "ATTN_K_NORM",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
    "mlp.gate": "FFN_GATE_INP",  # the MoE router (n_experts, dim)
}
# each routed expert's projection -> the tensor that stacks it over experts (n_experts, out, in)
EXPERT_TENSORS = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP", "down_proj": "FFN_DOWN_EXP"}


def gguf_architecture(config: MiniMindConfig) -> str:
    """llama.cpp's architecture that computes this model, or a UserError naming the field that has none."""
    if not config.qk_norm:
        if config.use_moe:
            raise UserError(
                "config field 'use_moe' is true: GGUF export writes MoE models only with QK-norm (llama.cpp's "
                "qwen3moe); for this MoE model use --to llama, which writes an exact Qwen2-MoE directory"
            )
        return "llama"
    if not config.use_moe:
        return "qwen3"
    if config.n_shared_experts:
        raise UserError(
            f"config field 'n_shared_experts' is {config.n_shared_experts}: llama.cpp's qwen3moe has routed "
            "experts only"
        )
    if not config.renormalises_top_k():
        raise UserError(
            "config field 'norm_topk_prob' (or 'norm_top1_prob' at top-1) is false: llama.cpp's qwen3moe always "
            "renormalises the chosen experts' weights"
        )
    return "qwen3moe"


def gguf_tensors(config: MiniMindConfig) -> dict[str, list[str]]:
    """GGUF tensor name -> our state-dict keys it holds (one, or every expert's, stacked), in file order."""
    import gguf

    arch = gguf.MODEL_ARCH[gguf_architecture(config).upper()]

    def name(member: str, block: int | None = None) -> str:
        tensor = gguf.MODEL_TENSOR[member]
        assert tensor in gguf.MODEL_TENSORS[arch], f"{member} is not a tensor of {arch.name}"
        return gguf.TENSOR_NAMES[tensor].format(bid=block) + ".weight"

    tensors = {name("TOKEN_EMBD"): ["model.embed_tokens.weight"]}
    for i in range(config.n_layers):
        for ours, member in BLOCK_TENSORS.items():
            if ours.startswith("self_attn.") and ours.endswith("_norm") and not config.qk_norm:
                continue
            if ours.startswith("mlp.") and (ours == "mlp.gate") != config.use_moe:
                continue
            tensors[name(member, i)] = [f"model.layers.{i}.{ours}.weight"]
        for ours, member in EXPERT_TENSORS.items() if config.use_moe else ():
            tensors[name(member, i)] = [f"model.layers.{i}.mlp.experts.{e}.{ours}.weight"
                                        for e in range(config.n_routed_experts)]
    tensors[name("OUTPUT_NORM")] = ["model.norm.weight"]
    return tensors


def gguf_tensor_names(config: MiniMindConfig) -> dict[str, str]:
    """Our state-dict key -> GGUF tensor name, for the tensors stored one to one (not the stacked experts)."""
    return {keys[0]: name for name, keys in gguf_tensors(config).items() if len(keys) == 1}


def to_gguf_layout(key: str, tensor: torch.Tensor, config: MiniMindConfig) -> np.ndarray:
    """Our fp32 tensor as llama.cpp expects its values (q/k rows in interleaved RoPE order for `llama`)."""
    if gguf_architecture(config) == "llama":
        if key.endswith("q_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_heads)
        elif key.endswith("k_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_kv_heads)
    return tensor.detach().float().numpy()


def encode_tensor(values: np.ndarray, dtype: str, keep_f32: bool = False):
    """-> (array to write, its GGML type). Norm vectors (and `keep_f32` tensors: the MoE router) stay f32 in
    every mode, as llama.cpp expects (its quantizer leaves `ffn_gate_inp` in float too)."""
    import gguf

    if dtype == "f32" or values.ndim == 1 or keep_f32:
        return values.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype in ("q8_0", "q4_0") and values.shape[-1] % QUANT_BLOCK == 0:
        quant = gguf.GGMLQuantizationType[dtype.upper()]
        return gguf.quants.quantize(values, quant), quant
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
    """Write `model_dir` as a GGUF file (`dtype` f32, f16, q8_0 or q4_0 for the matrices).

    q4_0 quantises every matrix whose rows are a multiple of 32 long, the token embedding (which llama.cpp
    also uses as the tied output head) included, like llama.cpp's `llama-quantize --pure`; its default
    recipe would keep that tensor in q6_K.
    """
    try:
        import gguf
    except ImportError:
        raise UserError(f"--to gguf needs the gguf package (the export extra): {install_hint('export')}") from None

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    model, tokenizer = load_model_dir(model_dir, dtype=torch.float32)
    config = model.config
    architecture = gguf_architecture(config)
    vocab = tokenizer_metadata(model_dir, tokenizer, config.vocab_size)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")  # renamed into place only when complete
    try:
        _write(gguf.GGUFWriter(str(partial), architecture), model, tokenizer, vocab, model_dir, dtype)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    write_modelfile(model_dir, out_file, tokenizer)
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
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[dtype]
    )
    if dtype in ("q8_0", "q4_0"):
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
    for name, keys in gguf_tensors(config).items():
        # experts stacked: (n_experts, out, in), the layout llama.cpp's *_exps tensors have
        values = np.stack([to_gguf_layout(key, state[key], config) for key in keys]) if len(keys) > 1 else \
            to_gguf_layout(keys[0], state[keys[0]], config)
        values, ggml_type = encode_tensor(values, dtype, keep_f32=keys[0].endswith("mlp.gate.weight"))
        writer.add_tensor(name, values, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_shape(writer, config: MiniMindConfig) -> None:
    """Hyperparameters under the architecture's prefix (`llama.`, `qwen3.`, `qwen3moe.`), YaRN (with its
    attention factor) included when the model uses it, the head size when it is not dim / n_heads, the experts
    for qwen3moe."""
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
    if config.qk_norm:  # qwen3 and qwen3moe read the head size here (768 = 8 x 96 for minimind-3, but not always)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.use_moe:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.yarn_factor > 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(config.yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(config.yarn_original_max_seq_len or config.max_seq_len)
        writer.add_rope_scaling_yarn_beta_fast(config.yarn_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(config.yarn_beta_slow)
        writer.add_rope_scaling_attn_factors(yarn_attn_factor(config))


def yarn_attn_factor(config: MiniMindConfig) -> float:
    """`<arch>.rope.scaling.attn_factor` for a YaRN model: llama.cpp scales cos/sin by this times its own
    0.1·ln(factor) + 1, so our scale (that recipe, or `yarn_attention_factor` when set: 1.0 for minimind-3) is
    divided by it; 1.0 for the default recipe."""
    _, scale = rope_frequencies(config)
    return scale / (0.1 * math.log(config.yarn_factor) + 1.0)
