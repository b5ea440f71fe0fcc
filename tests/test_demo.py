"""`minimind demo --quick`: every stage of the demo pipeline runs end to end and writes its report."""

from __future__ import annotations

import json

import pytest
import torch

from minimind.cli import main as cli
from minimind.demo import mean_sd
from minimind.device import cpu_info


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--quick"]) == 0
    for stage in ("tokenizer", "pretrain", "sft", "dpo", "grpo"):
        assert (out / stage).is_dir(), stage
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        assert (out / stage / "model.safetensors").is_file() and (out / stage / "report.md").is_file(), stage
    report = (out / "report.md").read_text(encoding="utf-8")
    assert (out / "grpo-seed2" / "summary.json").is_file()  # --quick keeps two GRPO seeds
    for line in ("held-out exact match, after SFT", "DPO held-out reward margin, after DPO",
                 "held-out exact match on facts stated in pretraining, after SFT",
                 "held-out exact match on arithmetic on unseen operand pairs, after SFT",
                 "GRPO held-out gain (greedy), mean ± sd over 2 seeds",
                 "GRPO held-out accuracy (greedy), after GRPO", "GRPO held-out accuracy (sampled T=1), SFT start",
                 "pretrain held-out loss", "unigram baseline loss", "| total |"):
        assert line in report, line
    grpo = json.loads((out / "grpo" / "summary.json").read_text())
    accuracy = grpo["held-out accuracy (greedy): trained"]
    answers = 2 * json.loads((out / "grpo" / "train_config.json").read_text())["batch_size"]  # --eval-batches 2
    assert accuracy * answers == pytest.approx(round(accuracy * answers))  # a count of right answers out of them
    assert f"| GRPO held-out accuracy (greedy), after GRPO | {accuracy:.3f} |" in report  # the number reported
    assert f"Machine: {cpu_info().model or 'unknown CPU'}, {torch.get_num_threads()} threads" in report
    printed = capsys.readouterr().out
    assert "$ minimind pretrain" in printed and "$ minimind grpo" in printed and "demo finished" in printed


def test_mean_sd_gives_the_sample_spread_and_each_value():
    assert mean_sd([0.1, 0.2, 0.3]) == "+0.200 ± 0.100 (+0.100, +0.200, +0.300)"
    assert mean_sd([-0.05]) == "-0.050 ± 0.000 (-0.050)"
