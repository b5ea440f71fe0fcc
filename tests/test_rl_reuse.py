"""Rollout reuse (--updates-per-rollout K, --minibatches M, PPO's --ppo-epochs) through the one trainer loop:
each rollout batch trains K·M optimizer steps, the importance ratio leaves 1 and the clip binds, the data moves
on once per rollout batch, and a run stopped mid-reuse resumes with identical losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_grpo import write_jsonl

from minimind.cli import main


def _rl_run(tmp_path: Path, model_dir: Path, verb: str, out: str, *extra: str) -> list[dict]:
    records = [{"conversations": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
               for i in range(16)]
    data = write_jsonl(tmp_path / "rl.jsonl", records)
    # A reward that varies between the untrained model's samples, so every group has an advantage to follow.
    (tmp_path / "variety.py").write_text("def variety(prompts, completions, answers, **kwargs):\n"
                                         "    return [len(set(c)) / 4.0 for c in completions]\n")
    args = [verb, "--data", str(data), "--init", str(model_dir), "--out", str(tmp_path / out), "--batch-size", "2",
            "--group-size", "3", "--max-new-tokens", "4", "--max-seq-len", "64", "--device", "cpu", "--dtype",
            "fp32", "--reward", f"{tmp_path / 'variety.py'}:variety", *extra]
    assert main(args) == 0
    return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.slow
def test_grpo_reuses_each_rollout_for_k_passes_of_m_minibatches_and_resumes_mid_reuse(tmp_path, model_dir):
    reuse = ["--updates-per-rollout", "2", "--minibatches", "2", "--loss", "dapo", "--clip-high", "0.28",
             "--max-steps", "6", "--lr", "1e-2", "--beta", "0.04"]
    whole = _rl_run(tmp_path, model_dir, "grpo", "a", *reuse)
    assert len(whole) == 6
    # Steps 1-4 train on one rollout batch (same rollout numbers), steps 5-6 on the next.
    assert len({r["reward_mean"] for r in whole[:4]}) == 1 and len({r["completion_len"] for r in whole[:4]}) == 1
    assert (whole[4]["reward_mean"], whole[4]["reward_std"]) != (whole[0]["reward_mean"], whole[0]["reward_std"])
    # Only the first step of a rollout batch samples: its FLOPs include sampling and the reference.
    assert whole[0]["tokens"] == whole[1]["tokens"] and whole[0]["mfu"] > 0
    # The first step's ratio is the sampling policy's own (1 up to float noise); later ones have moved and clip.
    assert abs(whole[0]["ratio_mean"] - 1.0) < 1e-4 and whole[0]["clip_fraction"] == 0.0
    assert max(abs(r["ratio_mean"] - 1.0) for r in whole[1:4]) > 1e-3
    assert max(r["clip_fraction"] for r in whole[1:4]) > 0
    # Stopped after step 3 (mid-reuse: the buffer travels in the checkpoint) and resumed: the same losses.
    _rl_run(tmp_path, model_dir, "grpo", "b", *reuse, "--stop-after-steps", "3")
    assert (tmp_path / "b" / "checkpoints" / "step-3" / "objective-rank0.pt").is_file()
    resumed = _rl_run(tmp_path, model_dir, "grpo", "b", *reuse, "--resume")

    def rows(records):
        return [(r["step"], r["loss"], r["reward_mean"], r["ratio_mean"]) for r in records]

    assert rows(resumed) == rows(whole)


@pytest.mark.slow
def test_ppo_epochs_move_the_ratio_clip_and_lower_the_value_loss(tmp_path, model_dir):
    rows = _rl_run(tmp_path, model_dir, "ppo", "ppo", "--ppo-epochs", "4", "--minibatches", "2", "--max-steps",
                   "8", "--lr", "1e-2", "--vf-coef", "1", "--value-clip", "0.5")
    assert len(rows) == 8
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["value_loss"]) for r in rows)
    # Eight optimizer steps on one rollout batch: the ratio leaves 1 and the clip binds.
    assert abs(rows[0]["ratio_mean"] - 1.0) < 1e-4
    assert max(abs(r["ratio_mean"] - 1.0) for r in rows[1:]) > 1e-3
    assert max(r["clip_fraction"] for r in rows) > 0
    # The critic fits the batch's returns: the last epoch's value loss (both minibatches) is below the first's.
    values = [r["value_loss"] for r in rows]
    assert sum(values[-2:]) < sum(values[:2])
