"""Causal attention forward + backward, one layer: our CPU GEMM blocks against SDPA's kernel, in one run.

    python bench/attention.py                              # small's heads (8 query, 2 K/V, 64 dims), 4 x 512
    python bench/attention.py --lengths 256 512 1024 2048  # a sweep; the ratio line is the last length's
    python bench/attention.py --quick

This is the attention of a training step (minimind/kernels/causal_blocks.py): q, k, v laid out as the model
makes them (heads of one projection), the output's gradient random, the inputs' gradients computed. The
model uses the blocks only at the lengths where this measured them faster (`MIN_LENGTH`..`MAX_LENGTH`); the
sweep shows why. Times are the best of alternating repetitions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_bench_arguments, bench_parser, interleaved, machine_line, ratio_line  # noqa: E402

from minimind.kernels.causal_blocks import MAX_LENGTH, MIN_LENGTH, causal_block_attention  # noqa: E402


def attention_inputs(batch: int, heads: int, kv_heads: int, length: int, head_dim: int):
    base = torch.randn(batch, length, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    q, k, v = (base[:, :heads], base[:, heads : heads + kv_heads], base[:, heads + kv_heads :])
    return [x.clone().requires_grad_() for x in (q, k, v)], torch.randn(batch, heads, length, head_dim)


def training_call(attend, inputs, grad):
    def call():
        for x in inputs:
            x.grad = None
        attend(*inputs).backward(grad)
    return call


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512], help="sequence lengths to time")
    add_bench_arguments(parser, repeats=(15, "timed calls per case (best counts)"),
                        quick="small shapes, few repetitions (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.lengths, args.repeats, args.head_dim = 1, [MIN_LENGTH], 2, 16
    print(machine_line())
    print(f"attention: batch {args.batch_size}, {args.heads} query / {args.kv_heads} K/V heads of {args.head_dim}, "
          f"fp32, forward + backward; the model uses the blocks from {MIN_LENGTH} to {MAX_LENGTH} positions")
    variants = {"blocks": causal_block_attention, "sdpa": sdpa}
    for length in args.lengths:
        inputs, grad = attention_inputs(args.batch_size, args.heads, args.kv_heads, length, args.head_dim)
        cases = {name: training_call(fn, inputs, grad) for name, fn in variants.items()}
        best = {name: min(times) for name, times in interleaved(cases, args.repeats, warmup=2).items()}
        print(f"  {length:5d} positions: " + "  ".join(f"{name} {best[name] * 1e3:7.2f} ms" for name in cases)
              + f"  (sdpa / blocks {best['sdpa'] / best['blocks']:.2f})")
    print(ratio_line("attention", 1 / best["blocks"], 1 / best["sdpa"], "calls/s"))


if __name__ == "__main__":
    main()
