"""Deterministic generator of MiniMind's bundled demo datasets.

All text is produced here from templates and the fact tables in `tables.py`; nothing is downloaded or
copied. The same seed and scale always give byte-identical files.

    python -m minimind.demo_data.generate --out minimind/demo_data            # regenerate the bundle
    python -m minimind.demo_data.generate --out /tmp/demo --seed 1 --scale 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from minimind.demo_data import records
from minimind.demo_data.common import HELD_OUT, Pools, lang_of, make_pools, make_rng, scaled
from minimind.demo_data.pretrain import paragraph
from minimind.help_format import HelpFormatter

# Sizes at scale 1.0. The pretraining file is sized in bytes, everything else in records.
PRETRAIN_BYTES = 3_000_000
PRETRAIN_EVAL_FRACTION = 0.02
COUNTS = {
    "sft.jsonl": 12_000,
    "sft_eval.jsonl": 300,
    "dpo.jsonl": 2_000,
    "dpo_eval.jsonl": 200,
    "rlaif.jsonl": 2_000,
    "rlaif_eval.jsonl": 200,
    "reasoning.jsonl": 1_000,
    "choice.jsonl": 200,
}
DESCRIPTIONS = {
    "pretrain.jsonl": '`{"text"}` prose paragraphs: facts, arithmetic, spelling, identity, stories, quizzes',
    "pretrain_eval.jsonl": "held-out paragraphs from the same distribution, for held-out loss",
    "sft.jsonl": '`{"conversations"}` short-answer chats; ~15% multi-turn, ~20% with a system prompt',
    "sft_eval.jsonl": "held-out questions; last assistant turn is the reference, `answer` the exact string",
    "dpo.jsonl": '`{"chosen", "rejected"}` pairs: wrong fact, rude reply or wrong identity rejected',
    "dpo_eval.jsonl": "held-out preference pairs (prompts disjoint from dpo.jsonl)",
    "rlaif.jsonl": "RL prompts; the last assistant turn is the short reference answer for a rule reward "
                   "(letter counts, short-answer facts, identity: kinds the demo model sometimes answers right)",
    "rlaif_eval.jsonl": "held-out RL prompts (disjoint from rlaif.jsonl)",
    "reasoning.jsonl": "`<think>...</think><answer>...</answer>` replies to multi-step problems",
    "choice.jsonl": "C-Eval/CMMLU-style `{question, A, B, C, D, answer}` about the table facts",
}
FILES = tuple(DESCRIPTIONS)


def _dump(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def _write_jsonl(path: Path, items: Iterable[dict]) -> int:
    """Write one JSON object a line ('\\n' endings on every platform); return the line count."""
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(_dump(item) + "\n")
            n += 1
    return n


def _pretrain(seed: int, stream: str, pools: Pools, budget: int, exclude: set[str]) -> list[str]:
    """Distinct paragraphs until their JSONL size reaches `budget` bytes, skipping any in `exclude`."""
    rng = make_rng(seed, stream)
    out: list[str] = []
    seen = set(exclude)
    size = 0
    attempts = 0
    while size < budget and attempts < budget:  # the attempt cap only matters for absurd budgets
        attempts += 1
        text = paragraph(rng, lang_of(len(out)), pools)
        if text in seen:
            continue
        seen.add(text)
        out.append(text)
        size += len(_dump({"text": text}).encode("utf-8")) + 1
    return out


def _provenance(seed: int, scale: float, counts: dict[str, int], sizes: dict[str, int]) -> str:
    h = HELD_OUT
    rows = "\n".join(
        f"| `{name}` | {counts[name]} | {sizes[name]:,} | {DESCRIPTIONS[name]} |" for name in FILES
    )
    return f"""# Demo data: provenance

Every `*.jsonl` file in this folder was written by `generate.py` (with `tables.py`, `common.py`, `qa.py`,
`wordplay.py`, `persona.py`, `pretrain.py` and `records.py` beside it) from templates and small tables
of facts written for this project. No text was copied from any other source and nothing is
downloaded: the facts themselves (capitals, chemical symbols, planet order, ...) are common knowledge,
and every sentence around them is produced by the templates. The files are released under the
project's licence, Apache-2.0.

Generated with seed {seed} and scale {scale}. To regenerate (byte-identical for the same seed and scale):

```
python -m minimind.demo_data.generate --out minimind/demo_data --seed {seed} --scale {scale}
```

## Splits

The generator splits the tables and the arithmetic operand pairs into a training side and a held-out
side (see `common.make_pools`):

- {h["sum_pairs"]} unordered addition/subtraction operand pairs and {h["product_pairs"]} single-digit
  products are held out of every training file (pretraining text included); the eval files ask
  arithmetic only about those.
- {h["countries"]} countries, {h["elements"]} elements, {h["animals"]} animals and {h["words"]} words
  are held out of every post-training file (sft, dpo, rlaif, reasoning) but *do* appear in the
  pretraining prose, so the fact questions in `sft_eval.jsonl` test knowledge carried over from
  pretraining.
- A few identity phrasings ("Please introduce yourself briefly.", ...) appear only in eval files.
- `pretrain_eval.jsonl` paragraphs never occur in `pretrain.jsonl`. `choice.jsonl` is a benchmark about
  all table entries.

Every file alternates English and Chinese records, so each is half of each language. Each
`sft_eval.jsonl` record also carries `answer` (the exact string a correct reply must contain) and
`kind` (the question type, for per-type scores). `tests/test_demo_data.py` checks that the committed
files equal a fresh run of the generator byte for byte.

## Files

| file | lines | bytes | contents |
|---|---:|---:|---|
{rows}
"""


def generate(out_dir: Path, seed: int = 0, scale: float = 1.0) -> dict[str, int]:
    """Write every demo dataset (and PROVENANCE.md) into `out_dir`; return {file name: line count}.

    `scale` multiplies every size (the pretraining byte budget and each record count); small scales
    still keep a few records of each language in every file. Each file has its own RNG stream
    derived from `seed`, so the output depends only on (seed, scale).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = make_pools(seed)

    pre = _pretrain(seed, "pretrain", train, max(2_000, round(PRETRAIN_BYTES * scale)), set())
    pre_eval = _pretrain(
        seed,
        "pretrain_eval",
        train,
        max(500, round(PRETRAIN_BYTES * PRETRAIN_EVAL_FRACTION * scale)),
        set(pre),
    )

    def n(name: str) -> int:
        return scaled(COUNTS[name], scale)

    data: dict[str, list[dict]] = {
        "pretrain.jsonl": [{"text": t} for t in pre],
        "pretrain_eval.jsonl": [{"text": t} for t in pre_eval],
        "sft.jsonl": records.sft(make_rng(seed, "sft"), train, n("sft.jsonl")),
        "sft_eval.jsonl": records.sft_eval(make_rng(seed, "sft_eval"), held, n("sft_eval.jsonl")),
        "dpo.jsonl": records.dpo(make_rng(seed, "dpo"), train, n("dpo.jsonl")),
        "dpo_eval.jsonl": records.dpo(make_rng(seed, "dpo_eval"), held, n("dpo_eval.jsonl")),
        "rlaif.jsonl": records.rlaif(make_rng(seed, "rlaif"), train, n("rlaif.jsonl")),
        "rlaif_eval.jsonl": records.rlaif(make_rng(seed, "rlaif_eval"), held, n("rlaif_eval.jsonl")),
        "reasoning.jsonl": records.reasoning(make_rng(seed, "reasoning"), train, n("reasoning.jsonl")),
        "choice.jsonl": records.choice(make_rng(seed, "choice"), n("choice.jsonl")),
    }
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name in FILES:
        path = out_dir / name
        counts[name] = _write_jsonl(path, data[name])
        sizes[name] = path.stat().st_size
    (out_dir / "PROVENANCE.md").write_text(
        _provenance(seed, scale, counts, sizes), encoding="utf-8", newline="\n"
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: `python -m minimind.demo_data.generate --out DIR [--seed N] [--scale F]`."""
    parser = argparse.ArgumentParser(
        prog="python -m minimind.demo_data.generate",
        description="Write MiniMind's demo datasets (pretrain, SFT, DPO, RLAIF, reasoning, choice) as JSONL.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (created if missing); use minimind/demo_data to refresh the bundle",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the bundled files use 0")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="size multiplier for every file (e.g. 0.05 for a tiny smoke-test set)",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    counts = generate(args.out, seed=args.seed, scale=args.scale)
    width = max(len(k) for k in counts)
    for name, lines in counts.items():
        print(f"{name:<{width}}  {lines:>6} lines  {(args.out / name).stat().st_size:>10,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
