"""SFT useful (non-pad) tokens per second: our packed rows against padding every sample to the max length.

    python bench/data.py                      # preset small, seq_len 512, batch 4, the bundled demo sft.jsonl
    python bench/data.py --preset tiny --quick

Ours is what `minimind sft` trains on: `PackedSFTDataset` rows (whole conversations packed next-fit into
seq_len + 1 tokens) with attention and positions per conversation (the model's `document_ids`).
The peer is the reference project's SFT pipeline: one conversation per row, cut and padded to seq_len + 1,
plain causal attention, logits for every position with pad positions masked out of the loss afterwards
(`LogitsMaskedLM`). Both run the same model, batch size and AdamW step; ours the trainer's `MaskedLM`, whose
output head runs on the positions in the loss only. A step includes building its batch from the dataset.

Useful tokens/s = (non-pad tokens per row, averaged over the whole dataset) x batch / step time, where the
step time is the best of --repeats interleaved steps over successive batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LogitsMaskedLM,
    add_bench_arguments,
    bench_parser,
    demo_tokenizer,
    interleaved,
    machine_line,
    ratio_line,
    scratch_dir,
    training_model,
)
from train import make_step  # noqa: E402

from minimind.data.datasets import PackedSFTDataset, stack_collate  # noqa: E402
from minimind.data.prepare import prepare  # noqa: E402
from minimind.data.shards import Shard  # noqa: E402
from minimind.demo_data import demo_file  # noqa: E402
from minimind.train.objective import MaskedLM  # noqa: E402


class PaddedSFT:
    """The reference pipeline: sample i alone in a row, cut to seq_len + 1 and right-padded."""

    def __init__(self, shard: Shard, seq_len: int, pad_id: int = 0):
        self.shard, self.seq_len, self.pad_id = shard, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.shard)

    def real_tokens(self, i: int) -> int:
        return min(int(self.shard.lengths()[i]), self.seq_len + 1) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.shard.sample(i)
        n = min(len(ids), self.seq_len + 1)
        row = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        loss = np.zeros(self.seq_len + 1, dtype=np.float32)
        row[:n], loss[:n] = ids[:n], mask[:n]
        row_t = torch.from_numpy(row)
        return {"input_ids": row_t[:-1], "labels": row_t[1:], "loss_mask": torch.from_numpy(loss[1:])}


def batches(dataset, batch_size: int):
    """An endless cycle of consecutive batches, built on demand (as a DataLoader would)."""
    start = 0
    while True:
        items = [dataset[(start + j) % len(dataset)] for j in range(batch_size)]
        start += batch_size
        yield stack_collate(items)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="small", help="model shape (random weights)")
    parser.add_argument("--data", default=None, help="SFT JSONL (default: the bundled demo sft.jsonl)")
    parser.add_argument("--seq-len", type=int, default=512, help="row length (the reference project's 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step, both pipelines")
    add_bench_arguments(parser, repeats=(4, "timed steps per pipeline (best counts)"),
                        quick="tiny model, seq_len 128, one repetition")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.seq_len, args.batch_size, args.repeats = "tiny", 128, 2, 1
    tokenizer, tokenizer_dir = demo_tokenizer()
    work = Path(scratch_dir("bench-data-"))
    data = Path(args.data) if args.data else demo_file("sft.jsonl")
    prepare(data, tokenizer_dir, "sft", work / "sft", progress=False)
    shard = Shard(work / "sft")
    packed = PackedSFTDataset(shard, args.seq_len, tokenizer.pad_token_id)
    padded = PaddedSFT(shard, args.seq_len, tokenizer.pad_token_id)
    packed_useful = sum(int((packed[r]["doc_ids"] >= 0).sum()) for r in range(len(packed))) / len(packed)
    padded_useful = sum(padded.real_tokens(i) for i in range(len(padded))) / len(padded)
    device, dtype = torch.device("cpu"), torch.float32
    model = training_model(args.preset, device, vocab_size=len(tokenizer))
    streams = {"packed": batches(packed, args.batch_size), "padded": batches(padded, args.batch_size)}
    steps = {"packed": make_step(model, MaskedLM(), None, device, dtype, hf=False),
             "padded": make_step(model, LogitsMaskedLM(), None, device, dtype, hf=False)}

    def case(name: str):
        return lambda: steps[name](next(streams[name]))

    print(machine_line())
    print(f"data: {data} ({len(shard)} conversations), seq_len {args.seq_len}; model preset {args.preset}, "
          f"batch {args.batch_size}, fp32 CPU")
    print(f"rows: packed {len(packed)} ({packed_useful:.1f} non-pad tokens per row, {packed.dropped} dropped), "
          f"padded {len(padded)} ({padded_useful:.1f} per row)")
    times = interleaved({name: case(name) for name in streams}, args.repeats)
    rates = {"packed": packed_useful * args.batch_size / min(times["packed"]),
             "padded": padded_useful * args.batch_size / min(times["padded"])}
    for name, seconds in times.items():
        print(f"{name:>7}: step {min(seconds):.3f}s best, {sorted(seconds)[len(seconds) // 2]:.3f}s median; "
              f"{rates[name]:.1f} useful tokens/s")
    print(ratio_line("data", rates["packed"], rates["padded"], "useful tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
