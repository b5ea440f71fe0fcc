"""Peak memory of one training step (forward + backward): ours against HF `LlamaForCausalLM` of the same shapes.

    python bench/memory.py                                   # preset tiny, batch 16 x 1024, fp32, CPU
    python bench/memory.py --preset small --batch-size 16 --seq-len 512
    python bench/memory.py --device cuda --dtype bf16 --preset base --batch-size 32

Each case runs in a fresh process: on CPU the figure is how far the step raises the process's peak resident
memory (`ru_maxrss`), on a GPU `torch.cuda.max_memory_allocated` above what the model and batch hold before
the step. Cases: `ours` (the trainer's `MaskedLM`, whose head and cross-entropy run chunk by chunk, see
minimind/kernels/head_loss.py), `ours-logits` (the same model with the whole (tokens x vocab) logits
materialised and `F.cross_entropy` on them: `LogitsMaskedLM`, as before), and `hf` (HF's own `labels=` loss).
The last line is `memory: ratio=<ours / hf>`: below 1, ours needs less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LogitsMaskedLM,
    add_bench_arguments,
    bench_parser,
    hf_twin,
    machine_line,
    preset_model,
    random_batch,
    ratio_line,
    training_model,
)
from train import DTYPES, add_step_arguments  # noqa: E402

from minimind.device import resolve_device  # noqa: E402
from minimind.train.objective import MaskedLM  # noqa: E402

CASES = ("ours", "ours-logits", "hf")
# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the heap
# and count towards the resident peak or not depending on allocation order (runs differed by up to 10%). A fixed
# threshold maps every large tensor on its own and returns it when freed, so the peak follows live memory.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def peak_mib(device: torch.device) -> float:
    """The process's peak memory so far, MiB (resident set on CPU, allocated on a GPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss counts bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def run_case(case: str, args) -> float:
    """One step of `case` in this process -> MiB the step added to the peak."""
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    if case == "hf":  # never build ours here: its freed memory would lower HF's figure (the peak so far)
        with torch.device("meta"):
            shape = preset_model(args.preset)
        model = hf_twin(shape, weights=False).to(device).train()
    else:
        model = training_model(args.preset, device)
    batch = random_batch(model.config.vocab_size, args.batch_size, args.seq_len, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_mib(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if case == "ours":
            loss = MaskedLM()(model, batch).loss_sum
        elif case == "ours-logits":
            loss = LogitsMaskedLM()(model, batch).loss_sum
        else:
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak_mib(device) - before


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    add_step_arguments(parser, "tiny", 16, 1024)
    add_bench_arguments(parser, quick="small batch (smoke test)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: one case, in a child process
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len = 2, 256
    if args.case:
        print(json.dumps({"mib": run_case(args.case, args)}))
        return 0
    forwarded = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                 "--device", args.device, "--dtype", args.dtype]
    print(machine_line())
    print(f"model: preset {args.preset}, batch {args.batch_size} x {args.seq_len}, {args.dtype} on {args.device}; "
          "peak memory one training step adds, each case in a fresh process")
    results = {}
    for case in CASES:
        child = subprocess.run([sys.executable, __file__, "--case", case, *forwarded], env=CHILD_ENV,
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-2000:], file=sys.stderr)
            return child.returncode
        results[case] = json.loads(child.stdout.strip().splitlines()[-1])["mib"]
        print(f"{case:>12}: {results[case]:9.1f} MiB")
    print(ratio_line("memory", results["ours"], results["hf"], "MiB"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
