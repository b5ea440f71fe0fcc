"""`minimind info` and the CLI's contract: --help everywhere, one-line errors, non-zero exits."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minimind.cli import VERBS, main
from minimind.info import count_parameters, flops_per_token, training_memory
from minimind.model import MiniMindConfig


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimind", *args], capture_output=True, text=True)


def test_info_prints_counts_flops_and_memory():
    result = run_cli("info", "--preset", "moe", "--batch-size", "4", "--seq-len", "128", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "145,029,760" in out and "active per token" in out and "FLOPs/token" in out
    for row in ("parameters", "gradients", "adam_states", "activations", "total"):
        assert row in out


def test_info_reads_an_adapters_base_and_refuses_empty_shapes(tmp_path, model_dir, capsys):
    import json

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_dir), "r": 4}))
    assert main(["info", "--model", str(model_dir)]) == 0
    base = capsys.readouterr().out
    assert main(["info", "--model", str(adapter)]) == 0
    assert capsys.readouterr().out == base.replace(str(model_dir), str(adapter))
    for flag in ("--seq-len", "--batch-size"):
        assert main(["info", flag, "0"]) == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_flops_and_memory_scale_sensibly():
    config = MiniMindConfig.from_preset("small")
    n = count_parameters(config).matmul_active
    assert flops_per_token(config, 1, training=False) == pytest.approx(2 * n, rel=1e-3)
    assert flops_per_token(config, 512) == 3 * flops_per_token(config, 512, training=False)
    half, small, big = (training_memory(config, b, 256) for b in (4, 8, 16))
    # Past one chunk of the head's rows, activations grow linearly with the tokens; the optimizer does not.
    assert big["activations"] - small["activations"] == 2 * (small["activations"] - half["activations"]) > 0
    assert big["adam_states"] == small["adam_states"]
    assert training_memory(config, 8, 256, "bf16")["activations"] < small["activations"]
    assert small["total"] == sum(v for k, v in small.items() if k != "total")


def test_every_verb_has_help(capsys):
    # In-process (one interpreter for all verbs); `python -m minimind info --help` below checks the entry point.
    for verb in VERBS:
        with pytest.raises(SystemExit) as exited:
            main([verb, "--help"])
        assert exited.value.code == 0, verb
        assert "usage: minimind " + verb in capsys.readouterr().out
    result = run_cli("info", "--help")
    assert result.returncode == 0 and "usage: minimind info" in result.stdout, result.stderr


def test_top_level_help_and_unknown_verb(capsys):
    assert main([]) == 0
    assert "verbs:" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown verb" in capsys.readouterr().err
