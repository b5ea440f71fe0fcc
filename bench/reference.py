"""Pretraining useful (non-pad) tokens per second: our trainer's rows against the reference project's recipe.

    python bench/reference.py                          # preset minimind3, seq_len 340, batch 4, the demo pretrain.jsonl
    python bench/reference.py --data pretrain_hq.jsonl --device cuda --dtype bf16
    python bench/reference.py --quick

The peer is the reference project's published pretraining approach, reimplemented from its description: one
document per row (`bos + text + eos`, cut to max_seq_len), right-padded to max_seq_len, the model's plain forward
(SDPA with a causal mask), logits for every position and cross-entropy over the non-pad labels (pad labels
-100). Ours is what `minimind pretrain` trains on: documents packed back to back into rows of seq_len + 1
tokens (`PackedPretrainDataset`), the kernels a training run selects, and the loss from hidden states at every
position (`MaskedLM`). Same model shape and initial weights, same rows per step, same AdamW step.

Useful tokens/s = non-pad target tokens per row (averaged over the whole file) x batch / best step time over
--repeats interleaved steps on successive batches. Prints `reference: ratio=...` last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DTYPES,
    add_bench_arguments,
    bench_parser,
    demo_tokenizer,
    interleaved,
    machine_line,
    preset_model,
    ratio_line,
    scratch_dir,
    training_model,
)
from data import batches  # noqa: E402
from train import make_step  # noqa: E402

from minimind.data.datasets import PackedPretrainDataset  # noqa: E402
from minimind.data.prepare import prepare  # noqa: E402
from minimind.data.shards import Shard  # noqa: E402
from minimind.demo_data import demo_file  # noqa: E402
from minimind.device import resolve_device  # noqa: E402
from minimind.train.objective import LossOutput, MaskedLM, Objective  # noqa: E402


class PaddedDocuments:
    """The reference recipe's rows: document i alone, cut to seq_len tokens, right-padded; labels -100 on pad."""

    def __init__(self, shard: Shard, seq_len: int, pad_id: int = 0):
        self.shard, self.seq_len, self.pad_id = shard, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.shard)

    def useful(self, i: int) -> int:
        """Non-pad targets of row i: its tokens but the first (each later one is predicted)."""
        return min(int(self.shard.lengths()[i]), self.seq_len) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, _ = self.shard.sample(i)
        n = min(len(ids), self.seq_len)
        row = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        row[:n] = ids[:n]
        labels = row.copy()
        labels[n:] = -100
        # loss_mask is only what the bench counts with (make_step's divisor); the loss itself ignores -100
        mask = np.zeros(self.seq_len, dtype=np.float32)
        mask[1:n] = 1.0
        return {"input_ids": torch.from_numpy(row), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(mask)}


class HFLabelsLoss(Objective):
    """The reference's loss: the model's own `labels=` cross-entropy (all logits, shift, ignore -100), summed."""

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
        return LossOutput(out.loss * batch["loss_mask"].sum(), out.aux_loss)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="minimind3", help="model shape (random weights)")
    parser.add_argument("--data", default=None, help="pretraining JSONL (default: the bundled demo pretrain.jsonl)")
    parser.add_argument("--seq-len", type=int, default=340, help="row length (the reference's pretraining 340)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step, both recipes")
    add_bench_arguments(parser, repeats=(3, "timed steps per recipe (best counts)"), device="cpu",
                        dtype=("fp32", "training dtype (autocast for bf16/fp16)"),
                        quick="tiny model, seq_len 128, one repetition")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.seq_len, args.batch_size, args.repeats = "tiny", 128, 2, 1
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    tokenizer, tokenizer_dir = demo_tokenizer()
    work = Path(scratch_dir("bench-reference-"))
    data = Path(args.data) if args.data else demo_file("pretrain.jsonl")
    prepare(data, tokenizer_dir, "pretrain", work / "pretrain", progress=False)
    shard = Shard(work / "pretrain")
    packed = PackedPretrainDataset(shard, args.seq_len, tokenizer.bos_token_id)
    padded = PaddedDocuments(shard, args.seq_len, tokenizer.pad_token_id)
    padded_useful = sum(padded.useful(i) for i in range(len(padded))) / len(padded)
    ours = training_model(args.preset, device, vocab_size=len(tokenizer))
    peer = preset_model(args.preset, vocab_size=len(tokenizer)).to(device).train()  # the same initial weights
    streams = {"ours": batches(packed, args.batch_size), "reference": batches(padded, args.batch_size)}
    steps = {"ours": make_step(ours, MaskedLM(), None, device, dtype, hf=False),
             "reference": make_step(peer, HFLabelsLoss(), None, device, dtype, hf=False)}

    def case(name: str):
        return lambda: steps[name]({k: v.to(device) for k, v in next(streams[name]).items()})

    print(machine_line())
    print(f"data: {data} ({len(shard)} documents, {shard.meta['n_tokens']} tokens), seq_len {args.seq_len}; "
          f"model preset {args.preset}, batch {args.batch_size}, {args.dtype} on {device}")
    print(f"rows: ours {len(packed)} packed ({args.seq_len} useful tokens per row), reference {len(padded)} "
          f"padded ({padded_useful:.1f} useful per row, {100 * padded_useful / args.seq_len:.1f}% of the row)")
    times = interleaved({name: case(name) for name in streams}, args.repeats, device)
    rates = {"ours": args.seq_len * args.batch_size / min(times["ours"]),
             "reference": padded_useful * args.batch_size / min(times["reference"])}
    for name, seconds in times.items():
        print(f"{name:>9}: step {min(seconds):.3f}s best, {sorted(seconds)[len(seconds) // 2]:.3f}s median; "
              f"{rates[name]:.1f} useful tokens/s")
    print(ratio_line("reference", rates["ours"], rates["reference"], "useful tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
