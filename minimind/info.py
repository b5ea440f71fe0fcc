"""`minimind info`: what a model costs before you train it — parameters, FLOPs per token, training memory.

    minimind info --preset small --batch-size 32 --seq-len 512 --dtype bf16

Counts are analytic (no model is built), so `base` and `moe` answer instantly. FLOPs per token follow the
usual accounting (PaLM appendix B; nanoGPT's MFU): a matmul with N weights costs 2N FLOPs forward and 4N
backward, plus attention's score/value matmuls. The trainer's MFU counts what each batch needs
(`training_flops`): the head only at positions in the loss, attention per packed document.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from minimind.device import dtype_name
from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.kernels.head_loss import chunk_rows
from minimind.model.configuration_minimind import PRESETS, MiniMindConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class ParamCount:
    total: int  # every parameter once (the tied head shares the embedding)
    active: int  # parameters a single token passes through (MoE: shared + top-k routed experts only)
    embedding: int
    matmul_active: int  # weights a token multiplies by, head included, embedding lookup excluded


def count_parameters(config: MiniMindConfig) -> ParamCount:
    """Exact parameter counts from the config's shapes (tested against the built model)."""
    d, q, kv = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    attention = 2 * d * q + 2 * d * kv
    expert = 3 * d * config.hidden_dim
    norms = 2 * d + (2 * config.head_dim if config.qk_norm else 0)  # QK-norm weights are matmul-free
    if config.use_moe:
        routed, shared = config.n_routed_experts, config.n_shared_experts
        routed_expert = 3 * d * config.moe_intermediate_size
        ffn_total = routed * routed_expert + shared * expert + routed * d  # + the router's weight
        ffn_active = config.num_experts_per_tok * routed_expert + shared * expert + routed * d
    else:
        ffn_total = ffn_active = expert
    embedding = config.vocab_size * d
    head = 0 if config.tie_word_embeddings else embedding
    per_layer_total, per_layer_active = attention + ffn_total + norms, attention + ffn_active + norms
    total = config.n_layers * per_layer_total + d + embedding + head
    active = config.n_layers * per_layer_active + d + embedding + head
    matmul = config.n_layers * (attention + ffn_active) + config.vocab_size * d
    return ParamCount(total=total, active=active, embedding=embedding, matmul_active=matmul)


def flops_per_token(config: MiniMindConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs to process one token at context `seq_len`: forward 2·N + 4·L·dim·T (QKᵀ and AV), training 3× that."""
    attention = 4 * config.n_layers * config.n_heads * config.head_dim * seq_len
    forward = 2 * count_parameters(config).matmul_active + attention
    return 3 * forward if training else forward


def forward_flops(config: MiniMindConfig, tokens: int, head_tokens: int, attention_pairs: int) -> float:
    """Forward FLOPs: `tokens` through the body, `head_tokens` of them through the output head, and
    `attention_pairs` (query, key) pairs (Σ over sequences of length², the convention of `flops_per_token`;
    packed documents count per document)."""
    head = config.vocab_size * config.dim
    body = count_parameters(config).matmul_active - head
    attention = 4.0 * config.n_layers * config.n_heads * config.head_dim * attention_pairs
    return 2.0 * body * tokens + 2.0 * head * head_tokens + attention


def training_flops(config: MiniMindConfig, tokens: int, head_tokens: int, attention_pairs: int) -> float:
    """Training FLOPs a batch needs (forward + backward = 3x `forward_flops`), the head at the positions in the
    loss only. Full rows of seq_len T with every position in the loss give tokens · flops_per_token(config, T)."""
    return 3.0 * forward_flops(config, tokens, head_tokens, attention_pairs)


def sampling_flops(config: MiniMindConfig, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Forward FLOPs of sampling `new_tokens` per row after a `prompt_len`-token prompt with a KV cache: the
    prefill (head at the last position only), then new_tokens - 1 steps of one token per row, each attending to
    the cache so far (a step at context c counts c pairs)."""
    steps = max(new_tokens - 1, 0)
    prefill = forward_flops(config, rows * prompt_len, rows, rows * prompt_len**2)
    pairs = rows * (steps * prompt_len + steps * (steps + 1) // 2)
    return prefill + forward_flops(config, rows * steps, rows * steps, pairs)


def training_memory(config: MiniMindConfig, batch_size: int, seq_len: int, dtype: str = "fp32") -> dict[str, float]:
    """Training memory in bytes, by row: parameters, gradients, Adam states, activations, total.

    With bf16/fp16 autocast PyTorch keeps fp32 weights and gradients and computes activations in 16 bits,
    so only the activation row shrinks. Activations are a rule-of-thumb count of what autograd saves per
    token per layer (norm inputs/outputs, q/k/v, attention output, the SwiGLU branches), plus what the training
    loss keeps: not the logits (head_loss.py runs the head a chunk of rows at a time) but the float32 gradient
    of the final hidden states, and one chunk's float32 logits and their gradient while it runs.
    """
    params = count_parameters(config).total
    act_bytes = BYTES[dtype]
    d, kv, h = config.dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    experts = (config.num_experts_per_tok + config.n_shared_experts) if config.use_moe else 1
    per_token_layer = 8 * d + 2 * kv + experts * 4 * h
    tokens = batch_size * seq_len
    head_chunk = min(tokens, chunk_rows(config.vocab_size, torch.device("cpu"))) * config.vocab_size * 8
    activations = tokens * (config.n_layers * per_token_layer * act_bytes + 4 * d) + head_chunk
    rows = {
        "parameters": params * 4,
        "gradients": params * 4,
        "adam_states": params * 8,
        "activations": activations,
    }
    rows["total"] = sum(rows.values())
    return rows


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}P"


def report(config: MiniMindConfig, batch_size: int, seq_len: int, dtype: str, name: str = "") -> str:
    """The text `minimind info` prints."""
    counts = count_parameters(config)
    lines = [f"model {name}".rstrip(), f"  dim={config.dim} layers={config.n_layers} heads={config.n_heads}/"
             f"{config.n_kv_heads} head_dim={config.head_dim} qk_norm={config.qk_norm} ffn={config.hidden_dim} "
             f"vocab={config.vocab_size} moe={config.use_moe}"]
    if config.use_moe:
        lines.append(f"  experts {config.n_routed_experts} routed (top-{config.num_experts_per_tok}, width "
                     f"{config.moe_intermediate_size}) + {config.n_shared_experts} shared")
    lines.append(f"  parameters          {counts.total:>14,}  ({_human(counts.total)})")
    if config.use_moe:
        lines.append(f"  active per token    {counts.active:>14,}  ({_human(counts.active)})")
    lines.append(f"  training FLOPs/token {flops_per_token(config, seq_len):>13,.0f}  at seq_len {seq_len}")
    lines.append(f"  inference FLOPs/token {flops_per_token(config, seq_len, training=False):>12,.0f}")
    lines.append(f"  training memory, batch {batch_size} x {seq_len}, {dtype} (AdamW):")
    for row, value in training_memory(config, batch_size, seq_len, dtype).items():
        lines.append(f"    {row:<12} {value / 2**20:>12,.1f} MiB")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), default="small", help="named model shape")
    parser.add_argument("--model", default=None, type=model_dir, help="read the config from this model directory instead")
    parser.add_argument("--batch-size", type=int, default=32, help="per-step batch for the memory estimate")
    parser.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    parser.add_argument("--dtype", choices=list(BYTES), type=dtype_name, default="fp32",
                        help="activation dtype (autocast; float32, bfloat16 and float16 are accepted too)")


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.model:
        from minimind.modeldir import adapter_source, load_config

        # an adapter's shape is its base's
        config, name = load_config(adapter_source(Path(args.model), ("config.json",))), args.model
    else:
        config, name = MiniMindConfig.from_preset(args.preset), args.preset
    print(report(config, args.batch_size, args.seq_len, args.dtype, name))
    return 0
