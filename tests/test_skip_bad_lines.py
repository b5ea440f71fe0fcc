"""`--skip-bad-lines` on the training verbs: bad JSONL lines are counted, named and skipped, and the run trains on
the good ones; without the flag the first bad line is a one-line error (file:line) and nothing is trained."""

from __future__ import annotations

import json

import pytest

from minimind.cli import main
from minimind.data.shards import Shard

TINY = ["--max-seq-len", "128", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--device", "cpu",
        "--dtype", "fp32", "--log-every", "1"]
BAD_LINES = ["{not json", '{"text": 7}', "[1, 2]"]  # each stage's reader rejects these three


def chat(i: int, answer: str) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus 1?"}, {"role": "assistant", "content": answer}]


GOOD = {
    "pretrain": lambda i: {"text": f"MiniMind counts: {i} plus 1 is {i + 1}."},
    "sft": lambda i: {"conversations": chat(i, f"{i + 1}.")},
    "dpo": lambda i: {"chosen": chat(i, f"{i + 1}."), "rejected": chat(i, f"{i + 7}.")},
    "grpo": lambda i: {"conversations": chat(i, str(i + 1))},
}


def write_data(path, stage: str) -> int:
    """40 good records with the bad lines at lines 2, 6 and 10; -> the number of good records."""
    lines = [json.dumps(GOOD[stage](i)) for i in range(40)]
    for at, bad in zip((1, 5, 9), BAD_LINES):
        lines.insert(at, bad)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 40


@pytest.mark.parametrize("stage", list(GOOD))
def test_training_verbs_skip_bad_lines_when_asked(tmp_path, tokenizer_dir, model_dir, stage, capsys):
    data = tmp_path / f"{stage}.jsonl"
    good = write_data(data, stage)
    source = ["--tokenizer", str(tokenizer_dir), "--preset", "tiny", "--set", "dim=64", "--set", "n_layers=2",
              "--set", "n_heads=4", "--set", "n_kv_heads=2"] if stage == "pretrain" else ["--init", str(model_dir)]
    extra = ["--group-size", "2", "--max-new-tokens", "4"] if stage == "grpo" else []
    args = [stage, "--data", str(data), *source, *TINY, *extra]

    assert main([*args, "--out", str(tmp_path / "strict")]) == 2  # without the flag: the first bad line
    assert f"minimind {stage}: error: {data}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "model.safetensors").exists()

    out = tmp_path / "lenient"
    assert main([*args, "--out", str(out), "--skip-bad-lines"]) == 0
    printed = capsys.readouterr().out
    assert f"{data}: {good} records, 3 bad lines skipped (first: line 2: " in printed
    (prepared,) = (out / "prepared").iterdir()
    assert Shard(prepared).meta["records"] == good and Shard(prepared).meta["skipped_lines"] == 3
    assert (out / "model.safetensors").is_file()
