"""`minimind demo` (what `make demo` runs): the whole pipeline on the bundled demo data, on CPU, in minutes.

Each stage is the same verb a user would type (printed as it runs), writing into `--out`:
tokenizer -> pretrain (tiny) -> sft -> held-out evaluation -> answers -> `report.md`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch

from minimind.cli import main as cli
from minimind.data.datasets import PackedSFTDataset, stack_collate
from minimind.data.prepare import prepare
from minimind.data.shards import Shard
from minimind.demo_data import demo_file
from minimind.errors import UserError
from minimind.eval import evaluate_exact
from minimind.infer.engine import Engine
from minimind.model.hub import load_model
from minimind.train.objective import MaskedLM

# CPU-sized settings: tuned so the whole demo stays well inside 15 minutes on 2 cores.
PRETRAIN_STEPS, SFT_STEPS, SEQ_LEN, BATCH = 600, 300, 256, 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="directory for every stage's output")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS, help="pretraining steps")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS, help="SFT steps")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="training sequence length")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="training batch size")


def step(title: str, argv: list[str]) -> float:
    """Run one verb as a user would, printing the command; returns its wall time."""
    print(f"\n== {title}\n$ minimind {shlex.join(argv)}", flush=True)
    start = time.time()
    code = cli(argv)
    if code != 0:
        raise UserError(f"demo step '{title}' failed with exit code {code}")
    return time.time() - start


def heldout_sft_loss(model_dir: Path, prepared: Shard, seq_len: int) -> float:
    """Mean next-token loss on the assistant replies of held-out conversations (nats/token)."""
    model = load_model(model_dir)
    dataset = PackedSFTDataset(prepared, seq_len)
    objective, total, count = MaskedLM(), 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(dataset), 8):
            batch = stack_collate([dataset[j] for j in range(i, min(i + 8, len(dataset)))])
            total += objective(model, batch).loss_sum.item()
            count += objective.count(batch).item()
    return total / count


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.time()
    tok, pre, sft = out / "tokenizer", out / "pretrain", out / "sft"
    common = ["--max-seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--device", "cpu",
              "--dtype", "fp32", "--log-every", "20"]
    times["tokenizer"] = step("1. tokenizer: byte-level BPE, 6400 tokens", [
        "tokenizer", "--data", str(demo_file("pretrain.jsonl")), "--vocab-size", "6400", "--out", str(tok)])
    times["pretrain"] = step("2. pretrain the tiny model on packed text", [
        "pretrain", "--data", str(demo_file("pretrain.jsonl")), "--eval-data", str(demo_file("pretrain_eval.jsonl")),
        "--tokenizer", str(tok), "--preset", "tiny", "--out", str(pre), "--max-steps", str(args.pretrain_steps),
        "--lr", "2e-3", "--warmup-steps", "30", "--eval-every", "100", *common])
    times["sft"] = step("3. supervised fine-tuning on conversations", [
        "sft", "--data", str(demo_file("sft.jsonl")), "--init", str(pre), "--out", str(sft),
        "--max-steps", str(args.sft_steps), "--lr", "1e-3", "--warmup-steps", "20", *common])
    print("\n== 4. held-out evaluation", flush=True)
    eval_prepared = out / "prepared-sft-eval"
    prepare(demo_file("sft_eval.jsonl"), tok, "sft", eval_prepared, progress=False)
    shard = Shard(eval_prepared)
    results = {
        "held-out reply loss, pretrained": heldout_sft_loss(pre, shard, args.seq_len),
        "held-out reply loss, after SFT": heldout_sft_loss(sft, shard, args.seq_len),
    }
    pre_summary = json.loads((pre / "summary.json").read_text())
    results["pretrain held-out loss"] = pre_summary.get("final held-out loss")
    results["unigram baseline loss"] = pre_summary.get("unigram baseline loss (held-out)")
    items = [json.loads(line) for line in demo_file("sft_eval.jsonl").read_text(encoding="utf-8").splitlines()]
    for name, model_dir in (("pretrained", pre), ("after SFT", sft)):
        exact = evaluate_exact(Engine.from_pretrained(model_dir), items, max_new_tokens=48)
        results[f"held-out exact match, {name}"] = exact["accuracy"]
    for key, value in results.items():
        print(f"   {key:<36} {value:.3f}")
    answers = sample_answers(sft, items)
    times["total"] = time.time() - start
    write_demo_report(out, results, times, answers)
    print(f"\ndemo finished in {times['total']:.0f}s; report: {out / 'report.md'}")
    return 0


def sample_answers(model_dir: Path, items: list[dict], limit: int = 8) -> list[tuple[str, str, str]]:
    """Print and return (question, expected, answer) for one held-out question of each kind."""
    engine, seen, rows = Engine.from_pretrained(model_dir), set(), []
    for item in items:
        kind = item.get("kind", "")
        if kind in seen or len(rows) >= limit:
            continue
        seen.add(kind)
        prompt = item["conversations"][:-1]
        reply = engine.chat(prompt, max_new_tokens=48, temperature=0.0)
        rows.append((prompt[-1]["content"], item.get("answer", ""), reply))
    print("\n== 5. answers to held-out questions (greedy, after SFT)")
    for question, expected, reply in rows:
        print(f"   Q: {question}\n   A: {reply}\n      (expected: {expected})")
    return rows


def write_demo_report(out: Path, results: dict, times: dict, answers: list[tuple[str, str, str]]) -> None:
    lines = ["# MiniMind demo run", "", "| measurement | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in results.items() if isinstance(v, float)]
    lines += ["", "| held-out question | expected | answer after SFT |", "|---|---|---|"]
    lines += [f"| {q} | {e} | {a.replace(chr(10), ' ')} |" for q, e, a in answers]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", "Stage reports: [pretrain](pretrain/report.md), [sft](sft/report.md)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
