"""Start-up time, load to first token, of `minimind generate` with no flags: a first start (empty compile cache) vs a second.

    python bench/startup.py                    # preset small, random weights, saved to a scratch model directory
    python bench/startup.py --model runs/sft   # a real model directory
    python bench/startup.py --quick            # tiny preset: does it run

Each start is a fresh Python process that does what the CLI does (`load_engine` on the parsed `generate` flags,
then stream one greedy token), timed from the process's first line to the first token, imports included:
  eager         --no-compile (the previous default)
  first         compile by default, with an empty --compile-cache directory (compiles and saves the step)
  second        the same again: the step is loaded from that directory
The order is eager, first, second, then (for --repeats > 1) eager and second again, the best of each counting.
Each line also gives the start's CPU seconds (its own and its compiler subprocesses'), which other jobs'
load on a shared machine stretches far less than the wall clock.
The last lines: `startup second vs eager: ratio=…` and `startup: ratio=<first/second>` (what the cache saves).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before any import: the child's start-up includes importing torch

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(argv: list[str]) -> None:
    """One start, as `minimind generate --model DIR [flags]` does it; prints a JSON line of its timings."""
    from minimind.infer.generate_cli import add_arguments
    from minimind.infer.options import load_engine

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", *argv, "--prompt", "x"])
    imported = time.perf_counter()
    engine = load_engine(args)
    loaded = time.perf_counter()
    next(iter(engine.stream("Hello", max_new_tokens=1, temperature=0.0, ignore_eos=True)), None)
    first = time.perf_counter()
    step = engine._decode_step
    times = os.times()  # CPU seconds, the compiler processes it started included: what load on the machine hides
    print(json.dumps({"import": imported - START, "load": loaded - imported, "first_token": first - loaded,
                      "total": first - START, "cpu": sum(times[:4]), "compiled": step is not None,
                      "loaded": bool(step is not None and step.loaded)}))


def start(model_dir: Path, flags: list[str]) -> dict:
    """Run one fresh process; -> its timings."""
    result = subprocess.run([sys.executable, __file__, "--child", str(model_dir), *flags], capture_output=True,
                            text=True, env={**os.environ, "MINIMIND_COMPILE": ""})
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise SystemExit(f"start-up run failed ({flags}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    from common import add_bench_arguments, append_json, bench_parser, machine_line, ratio_line, scratch_dir

    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="small", help="model preset with random weights (ignored with --model)")
    parser.add_argument("--model", default=None, help="a model directory instead of a preset")
    add_bench_arguments(parser, repeats=(2, "starts of eager and second (first runs once)"),
                        quick="tiny preset, one repetition (smoke test)", json=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.repeats = "tiny", 1
    work = Path(scratch_dir("bench-startup-"))
    model_dir = Path(args.model) if args.model else save_preset(args.preset, work / "model")
    print(machine_line())
    cache = ["--compile-cache", str(work / "compile")]
    runs: dict[str, list[dict]] = {"eager": [], "first": [], "second": []}
    runs["eager"].append(start(model_dir, ["--no-compile"]))
    runs["first"].append(start(model_dir, cache))
    for _ in range(args.repeats):
        runs["second"].append(start(model_dir, cache))
        if len(runs["eager"]) < args.repeats:
            runs["eager"].append(start(model_dir, ["--no-compile"]))
    if runs["first"][0]["loaded"] or not all(r["loaded"] for r in runs["second"]):
        raise SystemExit(f"startup: the first start should compile and the second load the saved step: {runs}")
    best = {name: min(r["total"] for r in group) for name, group in runs.items()}
    for name, group in runs.items():
        fastest = min(group, key=lambda r: r["total"])
        print(f"{name}: {fastest['total']:.2f} s to the first token (import {fastest['import']:.2f}, load "
              f"{fastest['load']:.2f}, first token {fastest['first_token']:.2f}; {fastest['cpu']:.2f} CPU s; "
              f"best of {len(group)})")
    append_json(args.json, {"bench": "startup", "model": args.model or args.preset, "runs": runs,
                            "machine": machine_line()})
    print(machine_line())
    print(ratio_line("startup second vs eager", best["second"], best["eager"], "s"))
    print(ratio_line("startup", best["first"], best["second"], "s"))
    return 0


def save_preset(preset: str, path: Path) -> Path:
    """A model directory of the preset with random weights and a quickly trained tokenizer."""
    import torch
    from common import bench_tokenizer

    from minimind.model import MiniMindConfig, MiniMindForCausalLM
    from minimind.modeldir import save_model_dir

    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset(preset)).eval()
    tokenizer, _ = bench_tokenizer(model.config.vocab_size)
    return Path(save_model_dir(model, tokenizer, path))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
