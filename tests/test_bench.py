"""The bench scripts run (tiny shapes, one repetition) and end with the `name: ratio=… (ours …, peer …)` line
that docs/performance.md quotes. They measure; this only checks they still work after a change."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"^[\w .-]+: ratio=\d+\.\d\d \(ours [\d.]+( [\w /-]+)?, peer [\d.]+( [\w /-]+)?\)$")


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["train.py", "--quick"],
    ["attention.py", "--quick"],
    ["data.py", "--quick"],
    ["prepare.py", "--quick"],
    ["prepare_scale.py", "--quick"],
    ["memory.py", "--quick"],
    ["grammar.py", "--quick"],
    ["rollout.py", "--quick", "--rollout-dtype", "bf16"],
    ["decode.py", "--quick", "--gguf-types"],
    ["int4_kernels.py", "--quick"],
    ["serve.py", "--preset", "tiny", "--clients", "2", "--new-tokens", "4", "--repeats", "1", "--device", "cpu"],
    ["reference.py", "--quick"],
    ["moe.py", "--quick"],
    ["moe_bound.py", "--quick", "--preset", "moe"],
    ["prefix.py", "--quick"],
    ["startup.py", "--quick"],
], ids=lambda argv: argv[0])
def test_bench_runs_and_prints_its_ratio_line(argv):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert RATIO.match(last), last
    assert last.startswith(argv[0].removesuffix(".py") + ":"), last


@pytest.mark.slow
def test_profile_step_puts_the_step_on_named_operators():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_step.py"), "--quick", "--top", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    sections = re.findall(r"^== (\S+): [\d.]+ ms per step .*\n((?:  .*\n?)+)", result.stdout, re.M)
    assert [name for name, _ in sections] == ["ours", "hf"], result.stdout
    for _, rows in sections:
        shares = [float(line.split("%")[0]) for line in rows.splitlines()]
        assert len(shares) == 4 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.05, rows
        assert "aten::mm" in rows, rows  # the projections' GEMMs lead a CPU step
