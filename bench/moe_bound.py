"""How fast the MoE presets could train and decode here in fp32: the floors under bench/moe.py's ratios.

    OMP_NUM_THREADS=1 python bench/moe_bound.py           # presets moe and minimind3-moe, process CPU time
    python bench/moe_bound.py --preset moe --repeats 5
    python bench/moe_bound.py --quick                     # narrow 2-layer models, one repetition: does it run

Training floor: the matmul FLOPs of our step (torch.utils.flop_counter over forward and backward; the same
products the HF model computes) at the best rate this CPU's GEMM reaches on the step's expert shapes with warm
operands, plus the fused AdamW step over the same parameters, timed alone. Doing the same fp32 arithmetic, no
implementation steps faster than that, so HF's step time / floor is the largest training ratio bench/moe.py
could print here.

Decode floor (batch --decode-batch): each projection of a decode step run bare on its rows (prepacked oneDNN,
as the Engine runs them; routed experts on their expected rows), every expert once, the routed experts'
part scaled by the share of experts the batch is expected to touch: the weight reads alone, at the speed of
the matmul the Engine uses. HF `generate`'s step (bench/decode.py's measure) / floor is the largest decode
ratio an Engine on that matmul could show (a kernel reading weights faster lowers the floor).

With one torch thread the clock is the process's CPU time, so other jobs on the machine change the figures
little; with more threads it is wall time. Prints `moe-bound-train-<preset>` and `moe-bound-decode-<preset>`
lines (ours = the floor's tokens/s, peer = HF's measured tokens/s), then `moe_bound: ratio=...`: the training
bound of the first preset.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from decode import hf_runner  # noqa: E402
from moe import QUICK_SHAPE, add_shape_arguments  # noqa: E402
from train import make_step  # noqa: E402

from minimind.infer.layout import pack_linears  # noqa: E402
from minimind.model.moe import MoEFeedForward  # noqa: E402
from minimind.train.objective import MaskedLM  # noqa: E402


def clock() -> float:
    """Process CPU time with one torch thread (load-independent), else wall time."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def best_seconds(fn, repeats: int) -> float:
    """Best of `repeats` timed calls of `fn` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def gemm_rate(rows: int, dim: int, width: int, repeats: int) -> float:
    """Best FLOP/s of the three products of a (rows, dim) x (dim, width) projection (forward, input and weight
    gradients) with warm operands."""
    x, w, g = torch.randn(rows, dim), torch.randn(width, dim), torch.randn(rows, width)
    products = [(x, w.t()), (g, w), (g.t(), x)]
    return max(2 * rows * dim * width / best_seconds(lambda a=a, b=b: a @ b, repeats) for a, b in products)


def train_floor(preset: str, args, overrides: dict) -> dict[str, float]:
    """Seconds per step: ours and HF measured, the floor, and its parts."""
    device = torch.device("cpu")
    ours = common.training_model(preset, device, **overrides)
    batch = common.random_batch(ours.config.vocab_size, args.batch_size, args.seq_len, device)
    steps = {"ours": make_step(ours, MaskedLM(), batch, device, torch.float32, hf=False, aux=True),
             "hf": make_step(common.hf_twin(ours), None, batch, device, torch.float32, hf=True, aux=True)}
    measured = {name: best_seconds(step, args.repeats) for name, step in steps.items()}
    with FlopCounterMode(display=False) as counter:
        out = MaskedLM()(ours, batch)
        (out.loss_sum / batch["loss_mask"].sum() + out.aux_loss).backward()
    c = ours.config
    rows = max(1, args.batch_size * args.seq_len * c.num_experts_per_tok // c.n_routed_experts)
    rate = gemm_rate(rows, c.dim, c.moe_intermediate_size, args.repeats)
    params = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    adamw = best_seconds(optimizer.step, args.repeats)
    flops = counter.get_total_flops()
    return {**measured, "flops": flops, "gemm_rate": rate, "adamw": adamw, "floor": flops / rate + adamw}


def decode_floor(preset: str, args, overrides: dict) -> dict[str, float]:
    """Seconds per batch decode step: HF `generate` measured, and the bare weight reads."""
    model = common.preset_model(preset, **overrides).eval()
    tokenizer, _ = common.bench_tokenizer(model.config.vocab_size)
    prompts = torch.randint(3, len(tokenizer), (args.decode_batch, 32), generator=torch.Generator().manual_seed(0))
    hf = hf_runner(common.hf_twin(model).eval(), prompts)
    n = args.new_tokens
    hf_step = (best_seconds(lambda: hf(n), args.repeats) - best_seconds(lambda: hf(1), args.repeats)) / (n - 1)
    pack_linears(model)
    c, b = model.config, args.decode_batch
    expert_rows = max(1, round(b * c.num_experts_per_tok / c.n_routed_experts))
    touched = 1 - (1 - c.num_experts_per_tok / c.n_routed_experts) ** b  # expected share of experts used
    routed = {id(m) for moe in model.modules() if isinstance(moe, MoEFeedForward) for m in moe.experts.modules()}
    routed_calls, other_calls = [], []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            is_routed = id(module) in routed
            x = torch.randn(expert_rows if is_routed else b, module.in_features)
            (routed_calls if is_routed else other_calls).append((module, x))

    def run(calls):
        return lambda: [module(x) for module, x in calls]

    with torch.inference_mode():
        routed_s = best_seconds(run(routed_calls), args.repeats)
        other_s = best_seconds(run(other_calls), args.repeats)
    return {"hf": hf_step, "routed": routed_s, "other": other_s, "touched": touched,
            "floor": routed_s * touched + other_s}


def main(argv: list[str] | None = None) -> int:
    parser = common.bench_parser(__doc__)
    add_shape_arguments(parser, batch_size=2, new_tokens=9)
    common.add_bench_arguments(parser, repeats=(3, "timed repetitions (best counts)"),
                               quick="narrow 2-layer models, short rows, one repetition (smoke test)")
    args = parser.parse_args(argv)
    overrides = QUICK_SHAPE if args.quick else {}
    if args.quick:
        args.batch_size, args.seq_len, args.new_tokens, args.repeats = 2, 32, 3, 1
    print(common.machine_line())
    lines, first = [], None
    for preset in args.preset:
        t = train_floor(preset, args, overrides)
        tokens = args.batch_size * args.seq_len
        print(f"{preset} train step: ours {t['ours']:.3f} s, hf {t['hf']:.3f} s; floor {t['floor']:.3f} s = "
              f"{t['flops'] / 1e9:.1f} GFLOP at {t['gemm_rate'] / 1e9:.1f} GFLOP/s + AdamW {t['adamw']:.3f} s")
        d = decode_floor(preset, args, overrides)
        print(f"{preset} decode step, batch {args.decode_batch}: hf {d['hf'] * 1e3:.1f} ms; floor "
              f"{d['floor'] * 1e3:.1f} ms = routed experts {d['routed'] * 1e3:.1f} ms x {d['touched']:.2f} touched "
              f"+ other projections {d['other'] * 1e3:.1f} ms")
        train_line = common.ratio_line(f"moe-bound-train-{preset}", tokens / t["floor"], tokens / t["hf"],
                                       "tokens/s")
        rows = args.decode_batch
        lines += [train_line, common.ratio_line(f"moe-bound-decode-{preset}", rows / d["floor"], rows / d["hf"],
                                                "tokens/s")]
        first = first or (tokens / t["floor"], tokens / t["hf"])
    print("\n".join(lines))
    print(common.ratio_line("moe_bound", *first, "tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
