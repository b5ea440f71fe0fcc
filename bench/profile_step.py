"""Where a training step's time goes: torch.profiler over the step `bench/train.py` times, ours and HF Llama.

    python bench/profile_step.py                                          # small, 4 x 512, fp32, CPU
    python bench/profile_step.py --device cuda --dtype bf16 --batch-size 32 --compile
    python bench/profile_step.py --quick                                  # tiny shapes, one step: does it run

For each case (ours, hf; with --compile their compiled forms too) it prints the step time and the operators
(CPU) or kernels (GPU) that take the most self time, with their share of the step, so a gap between the two
models, or between a model and the GEMM ceiling `bench/train.py` measures, can be put on named work.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_bench_arguments,
    bench_parser,
    compiled_training_model,
    hf_twin,
    machine_line,
    random_batch,
    sync,
    training_model,
)
from train import DTYPES, add_step_arguments, make_step  # noqa: E402

from minimind.device import resolve_device  # noqa: E402
from minimind.train.objective import MaskedLM  # noqa: E402


def profile_case(name: str, step, device: torch.device, steps: int, top: int) -> None:
    """Warm `step` up, time `steps` calls, then profile as many and print the `top` operators by self time."""
    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    # On a GPU only kernels count: an operator's self device time is its kernels' time, listed again.
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and getattr(e, key) > 0]
    events.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) / steps / 1e3
    print(f"\n== {name}: {seconds * 1e3:.2f} ms per step (timed), {total:.2f} ms of "
          f"{'device' if device.type == 'cuda' else 'CPU'} self time per profiled step")
    for event in events[:top]:
        ms = getattr(event, key) / steps / 1e3
        print(f"  {100 * ms / total:5.1f}%  {ms:8.3f} ms  x{event.count // steps:<4d} {event.key[:110]}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    add_step_arguments(parser, "small", 4, 512)
    parser.add_argument("--compile", action="store_true", help="also profile both models under torch.compile")
    parser.add_argument("--steps", type=int, default=3, help="steps timed and profiled per case")
    parser.add_argument("--top", type=int, default=15, help="operators printed per case")
    add_bench_arguments(parser, quick="tiny shapes and one step (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.batch_size, args.seq_len, args.steps = "tiny", 2, 64, 1
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    ours = training_model(args.preset, device)
    batch = random_batch(ours.config.vocab_size, args.batch_size, args.seq_len, device)
    print(machine_line())
    print(f"model: preset {args.preset}, batch {args.batch_size} x {args.seq_len}, {args.dtype} on {device}")
    models = {"ours": ours, "hf": hf_twin(ours)}
    if args.compile:
        models["ours+compile"] = compiled_training_model(args.preset, device)
        models["hf+compile"] = torch.compile(hf_twin(ours))
    for name, model in models.items():
        step = make_step(model, MaskedLM(), batch, device, dtype, hf=name.startswith("hf"))
        profile_case(name, step, device, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
