"""`minimind convert` as users type it: each command form of the contract once in a real subprocess; the
aliases and the error paths through the same dispatcher in-process (a subprocess costs ~5 s of imports)."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import random_model_dir, run_cli

from minimind.cli import main
from minimind.convert.gguf import export_gguf
from minimind.modeldir import load_model


def test_to_llama(tmp_path, tokenizer):
    source = random_model_dir(tmp_path / "src", tokenizer)
    result = run_cli("convert", source, "--to", "llama", "--out", tmp_path / "llama")
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"


def test_to_gguf(tmp_path, tokenizer):
    source = random_model_dir(tmp_path / "src", tokenizer)
    result = run_cli("convert", source, "--to", "gguf", "--out", tmp_path / "m.gguf", "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "q8_0" in result.stdout
    # the command writes exactly the file `export_gguf` writes (whose contents tests/test_convert_gguf.py checks)
    expected = export_gguf(source, tmp_path / "api.gguf", "q8_0")
    assert (tmp_path / "m.gguf").read_bytes() == expected.read_bytes()


@pytest.mark.slow
def test_minimind2_round_trip_through_both_spellings(tmp_path, tokenizer, tokenizer_dir, capsys):
    source = random_model_dir(tmp_path / "src", tokenizer)
    result = run_cli("convert", source, "--to", "minimind2", "--out", tmp_path / "a.pth")
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "convert", tmp_path / "a.pth", "--from", "minimind2-pth", "--tokenizer", tokenizer_dir,
        "--n-heads", "4", "--out", tmp_path / "imported",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "dim 64, 2 layers, dense" in result.stdout
    assert (
        main(
            ["convert", str(tmp_path / "imported"), "--to", "minimind2-pth", "--out", str(tmp_path / "b.pth")]
        )
        == 0
    )
    a, b = (
        torch.load(tmp_path / "a.pth", weights_only=True),
        torch.load(tmp_path / "b.pth", weights_only=True),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(load_model(source)(ids).logits, load_model(tmp_path / "imported")(ids).logits)


def test_from_minimind2_with_preset(tmp_path, tokenizer_dir):
    from test_convert_minimind2 import minimind2_state

    state = minimind2_state(dim=640, n_heads=8, n_layers=1, hidden=1728, experts=4, std=0.05)
    torch.save(state, tmp_path / "moe.pth")
    result = run_cli(
        "convert", tmp_path / "moe.pth", "--from", "minimind2", "--tokenizer", tokenizer_dir,
        "--preset", "moe", "--out", tmp_path / "moe",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "MoE 4+1 experts" in result.stdout
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (config["n_heads"], config["n_kv_heads"], config["num_experts_per_tok"]) == (8, 2, 2)


def test_merge_lora(tmp_path, tokenizer):
    from test_convert_lora import make_adapter

    base = random_model_dir(tmp_path / "base", tokenizer)
    make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "up_proj"])
    result = run_cli("convert", base, "--merge-lora", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert (
        "merged LoRA into 4 modules" in result.stdout
        and (tmp_path / "merged" / "model.safetensors").is_file()
    )


def test_mistakes_are_one_line_errors_with_exit_2(tmp_path, tokenizer, capsys):
    source = str(random_model_dir(tmp_path / "src", tokenizer))
    out = str(tmp_path / "x")
    capsys.readouterr()  # drop the save's progress bar
    cases = [
        (["--to", "llama", "--dtype", "f16"], "--dtype applies only to --to gguf"),
        (["--from", "minimind2"], "src: already a model directory of this project"),
        (["--to", "llama", "--preset", "small"], "--preset applies only to --from minimind2"),
        (["--merge-lora", source], "adapter_config.json is missing"),
        (["--from", "minimind2-pth", "--tokenizer", source], "src: already a model directory of this project"),
    ]
    for flags, message in cases:
        assert main(["convert", source, *flags, "--out", out]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["convert", str(tmp_path / "weights.pth"), "--from", "minimind2", "--out", out]) == 2
    assert "--from minimind2 needs --tokenizer DIR" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), "--to", "gguf", "--out", out + ".gguf"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # no mode: argparse's own usage error
        main(["convert", source, "--out", out])
    assert exit_info.value.code == 2
    assert "one of the arguments --to --from --merge-lora is required" in capsys.readouterr().err
