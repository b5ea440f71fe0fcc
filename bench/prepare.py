"""`minimind prepare` tokens/s against the training tokens/s of `small` on the same machine, in one run.

    python bench/prepare.py                    # the bundled demo pretrain.jsonl, small, batch 4 x 512
    python bench/prepare.py --data big.jsonl --kind pretrain --workers 3
    python bench/prepare.py --quick

Data preparation should never be what training waits for: the target is >= 20x the tokens/s of a `small`
training step. Prepare runs exactly what the CLI runs (`minimind.data.prepare.prepare`: parse, validate,
tokenize in --workers processes, write the memmap shard), timed end to end including starting the worker
pool; the training step is bench/train.py's (ours, fp32, forward + backward + AdamW). They alternate, and
the best repetition of each counts.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_bench_arguments,
    bench_parser,
    demo_tokenizer,
    interleaved,
    machine_line,
    random_batch,
    ratio_line,
    scratch_dir,
    training_model,
)
from train import make_step  # noqa: E402

from minimind.data.prepare import prepare  # noqa: E402
from minimind.demo_data import demo_file  # noqa: E402
from minimind.train.objective import MaskedLM  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--data", default=None, help="JSONL to prepare (default: the bundled demo pretrain.jsonl)")
    parser.add_argument("--kind", default="pretrain", help="dataset kind, as `minimind prepare --kind`")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokenizer processes (the CLI's default)")
    parser.add_argument("--preset", default="small", help="model of the training step compared against")
    parser.add_argument("--batch-size", type=int, default=4, help="training rows per step")
    parser.add_argument("--seq-len", type=int, default=512, help="training tokens per row")
    add_bench_arguments(parser, repeats=(3, "repetitions of each (best counts)"), quick="tiny model, one repetition")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.seq_len, args.batch_size, args.repeats = "tiny", 128, 2, 1
    data = Path(args.data) if args.data else demo_file("pretrain.jsonl")
    _, tokenizer_dir = demo_tokenizer()
    work = Path(scratch_dir("bench-prepare-"))
    tokens: list[int] = []

    def run_prepare() -> None:
        out = work / "shard"
        shutil.rmtree(out, ignore_errors=True)
        tokens.append(prepare(data, tokenizer_dir, args.kind, out, workers=args.workers, progress=False)["n_tokens"])

    model = training_model(args.preset, torch.device("cpu"))
    batch = random_batch(model.config.vocab_size, args.batch_size, args.seq_len)
    step = make_step(model, MaskedLM(), batch, torch.device("cpu"), torch.float32, hf=False)
    print(machine_line())
    print(f"prepare: {data} ({data.stat().st_size / 1e6:.1f} MB, kind {args.kind}, {args.workers} workers); "
          f"training: preset {args.preset}, batch {args.batch_size} x {args.seq_len}, fp32")
    started = time.perf_counter()
    times = interleaved({"prepare": run_prepare, "train": step}, args.repeats, warmup=0)
    prepare_rate = tokens[-1] / min(times["prepare"])
    train_rate = args.batch_size * args.seq_len / min(times["train"])
    print(f"prepare: {tokens[-1]:,} tokens in {min(times['prepare']):.2f}s best -> {prepare_rate:,.0f} tokens/s")
    print(f"  train: {args.batch_size * args.seq_len} tokens per step in {min(times['train']):.2f}s best "
          f"(first step included) -> {train_rate:,.1f} tokens/s; bench took {time.perf_counter() - started:.0f}s")
    print(ratio_line("prepare", prepare_rate, train_rate, "tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
