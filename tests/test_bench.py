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
    ["data.py", "--quick"],
    ["prepare.py", "--quick"],
    ["memory.py", "--quick"],
    ["decode.py", "--quick", "--gguf-types"],
    ["serve.py", "--preset", "tiny", "--clients", "2", "--new-tokens", "4", "--repeats", "1", "--device", "cpu"],
], ids=lambda argv: argv[0])
def test_bench_runs_and_prints_its_ratio_line(argv):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert RATIO.match(last), last
    assert last.startswith(argv[0].removesuffix(".py") + ":"), last
