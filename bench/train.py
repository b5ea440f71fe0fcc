"""Training-step speed and MFU: our model and objective against HF `LlamaForCausalLM` (Qwen3 for the QK-norm presets) of the same shapes.

    python bench/train.py                                  # preset small, batch 4 x 512, fp32, CPU
    python bench/train.py --compile                        # also both models under torch.compile
    python bench/train.py --device cuda --dtype bf16 --compile --preset base --batch-size 16
    python bench/train.py --quick                          # tiny shapes, one repetition: does it run

A step is what the trainer does: forward, loss, backward, gradient clipping at 1.0, AdamW (fused, as the trainer),
under autocast for bf16/fp16. Ours computes the loss with the trainer's objective (`MaskedLM`); HF with
its own `labels=` loss. Both start from the same weights and see the same random batch. Cases run
interleaved (ours, HF, ceiling, ours, ...) and the best repetition counts.

MFU = FLOPs per token (`minimind.info.flops_per_token`, the trainer's formula) x tokens/s / ceiling,
where the ceiling is measured in the same run: the forward GEMMs of this model at this batch (M = batch x
seq_len rows against every weight shape), in the training dtype, best repetition. Also printed: MFU
against the square matmul the trainer's `mfu` metric divides by on CPU (1024; 8192 here on a GPU) and,
on a GPU, against the datasheet bf16 peak the trainer uses there. The last line compares eager ours with
eager HF.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DTYPES,
    add_bench_arguments,
    append_json,
    bench_parser,
    compiled_training_model,
    hf_twin,
    interleaved,
    machine_line,
    random_batch,
    ratio_line,
    training_model,
)

from minimind.device import resolve_device  # noqa: E402
from minimind.info import flops_per_token  # noqa: E402
from minimind.train.mfu import measure_matmul_flops, peak_flops  # noqa: E402
from minimind.train.objective import MaskedLM  # noqa: E402


def add_step_arguments(parser: argparse.ArgumentParser, preset: str, batch_size: int, seq_len: int) -> None:
    """The training-step benches' shape flags: --preset, --batch-size, --seq-len, --device, --dtype."""
    parser.add_argument("--preset", default=preset, help="model shape (random weights)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per row")
    add_bench_arguments(parser, device="cpu", dtype=("fp32", "autocast dtype (weights stay fp32)"))


def gemm_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of every weight a token multiplies by in one forward, one entry per layer's matrix."""
    d, kv, h = config.dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    q = config.n_heads * config.head_dim
    per_layer = [(d, q), (d, kv), (d, kv), (q, d), (d, h), (d, h), (h, d)]
    return per_layer * config.n_layers + [(d, config.vocab_size)]


def gemm_ceiling(config, rows: int, device: torch.device, dtype: torch.dtype):
    """-> (run, flops): `run()` does this model's forward GEMMs for `rows` tokens; `flops` is their count."""
    generator = torch.Generator().manual_seed(0)
    shapes = sorted(set(gemm_shapes(config)))
    counts = {s: gemm_shapes(config).count(s) for s in shapes}
    x = {k: torch.randn(rows, k, generator=generator).to(device, dtype) for k, _ in shapes}
    w = {s: torch.randn(s, generator=generator).to(device, dtype) for s in shapes}

    def run() -> None:
        for shape in shapes:
            for _ in range(counts[shape]):
                x[shape[0]] @ w[shape]

    return run, sum(2 * rows * k * n * c for (k, n), c in counts.items())


def make_step(model, objective, batch: dict | None, device: torch.device, dtype: torch.dtype, hf: bool,
              aux: bool = False):
    """`step(other_batch=None)`: one training step of `model` on `batch` (or another), as the trainer runs it.
    `aux`: an MoE's load-balancing loss joins the loss (ours: the objective's `aux_loss`, as the trainer adds it;
    HF: `output_router_logits=True`, its own router loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    default = batch

    def step(batch: dict | None = None) -> None:
        batch = default if batch is None else batch
        count = batch["loss_mask"].sum()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if hf:
                router = {"output_router_logits": True} if aux else {}
                loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False, **router).loss
            else:
                out = objective(model, batch)
                loss = out.loss_sum / count + (out.aux_loss if aux else 0.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    add_step_arguments(parser, "small", 4, 512)
    add_bench_arguments(parser, repeats=(5, "timed steps per case (best counts)"))
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--no-peer", action="store_true", help="time ours only (no HF model)")
    add_bench_arguments(parser, quick="tiny shapes and one repetition (smoke test)", json=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.batch_size, args.seq_len, args.repeats = "tiny", 2, 64, 1
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    ours = training_model(args.preset, device)
    config = ours.config
    batch = random_batch(config.vocab_size, args.batch_size, args.seq_len, device)
    objective = MaskedLM()
    cases = {"ours": make_step(ours, objective, batch, device, dtype, hf=False)}
    if not args.no_peer:
        cases["hf"] = make_step(hf_twin(ours), None, batch, device, dtype, hf=True)
    if args.compile:
        cases["ours+compile"] = make_step(compiled_training_model(args.preset, device),
                                          objective, batch, device, dtype, hf=False)
        if not args.no_peer:
            cases["hf+compile"] = make_step(torch.compile(hf_twin(ours)), None, batch, device, dtype, hf=True)
    rows = args.batch_size * args.seq_len
    ceiling_run, ceiling_flops = gemm_ceiling(config, rows, device, dtype)
    cases["ceiling"] = ceiling_run
    print(machine_line())
    print(f"model: preset {args.preset} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params), "
          f"batch {args.batch_size} x {args.seq_len}, {args.dtype} on {device}; {args.repeats} repetitions")
    times = interleaved(cases, args.repeats, device, warmup=2 if args.compile else 1)
    ceiling = ceiling_flops / min(times.pop("ceiling"))
    side = 8192 if device.type == "cuda" else 1024
    square = measure_matmul_flops(device, dtype, n=side)
    datasheet = peak_flops(device, dtype) if device.type == "cuda" else None
    flops = flops_per_token(config, args.seq_len, training=True)
    print(f"ceiling: {ceiling / 1e9:.1f} GFLOP/s (this model's GEMMs at {rows} rows); square {side} matmul "
          f"{square / 1e9:.1f} GFLOP/s; {flops / 1e6:.1f} MFLOP per token"
          + (f"; datasheet peak {datasheet / 1e12:.0f} TFLOP/s" if datasheet else ""))
    results = {}
    for name, seconds in times.items():
        rate = rows / min(seconds)
        results[name] = {"tokens_per_sec": rate, "mfu": flops * rate / ceiling, "mfu_square": flops * rate / square,
                         "step_seconds": sorted(seconds)}
        extra = ""
        if datasheet:
            results[name]["mfu_datasheet"] = flops * rate / datasheet
            extra = f", {100 * flops * rate / datasheet:5.1f}% of the datasheet"
        print(f"{name:>13}: {rate:8.1f} tokens/s  MFU {100 * flops * rate / ceiling:5.1f}% of the GEMM ceiling "
              f"({100 * flops * rate / square:5.1f}% of the square matmul{extra})  steps {min(seconds):.3f}s "
              f"best, {sorted(seconds)[len(seconds) // 2]:.3f}s median")
    append_json(args.json, {"bench": "train", "preset": args.preset, "device": str(device), "dtype": args.dtype,
                            "batch": args.batch_size, "seq_len": args.seq_len, "ceiling_flops": ceiling,
                            "square_flops": square, "results": results, "machine": machine_line()})
    if args.compile and not args.no_peer:
        mine, theirs = results["ours+compile"]["tokens_per_sec"], results["hf+compile"]["tokens_per_sec"]
        print(ratio_line("train compiled", mine, theirs, "tokens/s"))
        print(ratio_line("train ours compiled vs hf eager", mine, results["hf"]["tokens_per_sec"], "tokens/s"))
    if not args.no_peer:
        print(ratio_line("train", results["ours"]["tokens_per_sec"], results["hf"]["tokens_per_sec"], "tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
