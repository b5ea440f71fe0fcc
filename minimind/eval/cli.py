"""`minimind eval`: perplexity, multiple-choice accuracy, or exact-match of chat answers.

    minimind eval --model runs/pretrain --task ppl --data texts.jsonl          # {"text"} lines
    minimind eval --model runs/sft --task choice                               # bundled C-Eval-style set
    minimind eval --model runs/sft --task choice --data ceval/val/physics_val.csv   # C-Eval/CMMLU's own CSV
    minimind eval --model runs/sft --task exact --data held_out.jsonl --output result.json

Without `--data` each task uses its bundled demo file (ppl: pretrain.jsonl, choice: choice.jsonl,
exact: sft_eval.jsonl). Results print as a table; `--output` saves them as JSON
{"task", "n", "accuracy" | "ppl", ...}. Formulas and prompt formats: minimind/eval/{ppl,choice,exact}.py.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

from tqdm import tqdm

from minimind.errors import UserError
from minimind.eval.choice import evaluate_choice, validate_choice
from minimind.eval.exact import evaluate_exact, validate_exact
from minimind.eval.ppl import evaluate_ppl
from minimind.infer.options import add_model_arguments, load_engine
from minimind.records import BadRecord, read_records

DEFAULT_DATA = {"ppl": "pretrain.jsonl", "choice": "choice.jsonl", "exact": "sft_eval.jsonl"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--task", required=True, choices=sorted(DEFAULT_DATA),
                        help="ppl: perplexity/bits-per-byte of {text}; choice: C-Eval-format accuracy; "
                             "exact: greedy chat answers vs references")
    parser.add_argument("--data", default=None, help="JSONL (.gz, .zst), Parquet, a directory or glob of them, "
                        "hf:ORG/NAME; or for choice also a C-Eval/CMMLU CSV file (default: the task's bundled demo file)")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--score", default="mean", choices=["mean", "sum"],
                        help="choice: rank options by mean or summed log-probability per option")
    parser.add_argument("--window", type=int, default=None,
                        help="ppl: tokens per scoring window (default: the model's max_seq_len)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="exact: cap on each answer's tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="exact: prompts answered together")
    parser.add_argument("--max-batch-tokens", type=int, default=8192,
                        help="ppl/choice: padded tokens per forward pass (lower it if memory runs out)")


def _passthrough(validate):
    """A reader validator that checks a record and keeps it raw (the evaluate_* functions take raw items)."""

    def check(obj):
        validate(obj)
        return obj

    return check


def load_items(task: str, path: Path, max_samples: int | None) -> list:
    """Records of `path` for `task`, validated with file:line errors; at most `max_samples`."""
    if task == "ppl":
        records = read_records(path, "pretrain")
    elif task == "choice" and path.suffix.lower() == ".csv":
        records = read_choice_csv(path)
    else:
        validate = validate_choice if task == "choice" else validate_exact
        records = read_records(path, task, validate=_passthrough(validate))
    return list(itertools.islice(records, max_samples))


def read_choice_csv(path: Path):
    """Rows of a C-Eval (`id,question,A,B,C,D,answer,...`) or CMMLU (`,Question,A,B,C,D,Answer`) CSV file as
    records, each validated, a bad one reported as `file:line: what is wrong`."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                try:
                    validate_choice(row)
                except BadRecord as err:
                    raise UserError(f"{path}:{reader.line_num}: {err}") from None
                yield row
        except (csv.Error, UnicodeDecodeError) as err:
            raise UserError(f"{path}:{reader.line_num}: not readable as CSV ({err})") from None


def run(args: argparse.Namespace) -> int:
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples is {args.max_samples}; expected a positive number")
    if args.data is None:
        from minimind.demo_data import demo_file

        path = demo_file(DEFAULT_DATA[args.task])
    else:
        path = Path(args.data)
    items = load_items(args.task, path, args.max_samples)
    engine = load_engine(args, compile_default=False)  # batched scoring: compile only when asked (--compile)
    model, tokenizer = engine.model, engine.tokenizer
    with tqdm(total=len(items), desc=f"eval {args.task}", unit="item", leave=False, disable=None) as bar:
        if args.task == "ppl":
            if args.window is not None and args.window < 2:
                raise UserError(f"--window is {args.window}; expected at least 2 tokens")
            bar.total = None  # long texts split into several windows: count windows instead
            result = evaluate_ppl(model, tokenizer, items, args.window, args.max_batch_tokens, bar.update)
        elif args.task == "choice":
            result = evaluate_choice(model, tokenizer, items, args.score, args.max_batch_tokens, bar.update)
        else:
            result = evaluate_exact(engine, items, args.max_new_tokens, args.batch_size, bar.update)
    result = {"task": result.pop("task"), "model": str(args.model), "data": str(path), **result}
    print(format_table(result))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {out}")
    return 0


def format_table(result: dict) -> str:
    """Two columns, scalar fields only (lists such as per-item predictions go to --output)."""
    rows = [(k, v) for k, v in result.items() if not isinstance(v, (list, dict))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
