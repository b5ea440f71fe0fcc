"""Packaging and the CLI's surface: the distribution name and install hints, `--version`, shell completion,
help texts (no internal references, no doubled or empty defaults), the gguf extra, `--dtype` long names and
the run-length warmup default."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import minimind
from minimind.cli import VERBS, build_parser, main
from minimind.errors import DISTRIBUTION, install_hint
from minimind.train.args import TrainConfig
from minimind.train.schedule import lr_at

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- distribution name, extras, version ------------------------------------------------------------------

def test_distribution_name_extras_and_version_come_from_one_place():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["name"] == DISTRIBUTION == "minimind-llm"  # `minimind` on the index is another project
    assert meta["scripts"]["minimind"] == "minimind.cli:main"
    assert "version" in meta["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "minimind.__version__"}
    # gguf is the export extra's (and dev's), not a core dependency; build/twine never are
    assert not any(dep.startswith(("gguf", "build", "twine")) for dep in meta["dependencies"])
    extras = meta["optional-dependencies"]
    assert any(dep.startswith("gguf") for dep in extras["export"]) and any(d.startswith("gguf") for d in extras["dev"])
    assert {"serve", "export", "deepspeed", "release"} <= set(extras)


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"minimind {minimind.__version__}"
    result = subprocess.run([sys.executable, "-m", "minimind", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"minimind {minimind.__version__}", result.stderr


def test_every_install_hint_names_a_package_that_is_ours():
    # `pip install 'minimind[...]'` would install the other project: every hint uses our name, or a clone's `-e .`
    bad = re.compile(r"(?<![\w-])minimind\[")
    offenders = []
    for path in [REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("minimind/**/*.py"),
                 *REPO.glob("bench/**/*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if bad.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert install_hint("serve") == "pip install 'minimind-llm[serve]' (from a clone: pip install -e '.[serve]')"


def test_missing_extras_are_one_line_naming_the_extra(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the export extra were not installed
    out = tmp_path / "model.gguf"
    assert main(["convert", str(model_dir), "--to", "gguf", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert line == ("minimind convert: error: --to gguf needs the gguf package (the export extra): "
                    f"{install_hint('export')}")
    assert not any(tmp_path.iterdir())  # nothing written
    monkeypatch.setitem(sys.modules, "streamlit", None)
    assert main(["web", "--models-dir", str(tmp_path)]) == 2
    assert one_error_line(capsys).endswith(f"minimind web needs streamlit: {install_hint('serve')}")


# ---- help texts ------------------------------------------------------------------------------------------

def test_every_verbs_help_has_no_internal_references_and_no_doubled_or_empty_defaults():
    for verb in VERBS:
        parser = build_parser(verb)
        text = " ".join(parser.format_help().split())  # unwrapped: a default may straddle a line break
        for banned in ("§", "SPEC", "(default: None)", "(default: False)", "(default: [])", "(default: )"):
            assert banned not in text, (verb, banned)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help:
                help_ = formatter._expand_help(action)
                says = re.findall(r"\(default\b|\bby default\b|\bdefaults to\b", help_.lower())
                assert len(says) <= 1, (verb, action.option_strings, help_)  # the default is told once
    lr = next(a for a in build_parser("pretrain")._actions if "--lr" in a.option_strings)
    assert build_parser("pretrain")._get_formatter()._expand_help(lr).endswith("(default: 0.001)")


def test_help_formatter_appends_only_what_the_help_does_not_say(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "TCP port (0: any free one) (default: 8998)" in text  # a real default is shown once
    assert "weights dtype (default: as saved;" in text and "as saved; float32, bfloat16 and float16 are accepted too)" \
        " (default" not in text  # the help already says it: nothing appended
    from minimind.demo_data import generate  # the demo-data generator's own command uses the same formatter

    with pytest.raises(SystemExit):
        generate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "the bundled files use 0 (default: 0)" in text


# ---- shell completion ------------------------------------------------------------------------------------

def complete(script: Path, *words: str) -> list[str]:
    """What bash offers after `minimind WORDS…` (the last word is the one being completed)."""
    words_ = " ".join(f"'{w}'" for w in ("minimind", *words))
    probe = (f"source '{script}'; COMP_WORDS=({words_}); COMP_CWORD={len(words)}; "
             f"COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; _shtab_minimind; "
             "printf '%s\\n' \"${COMPREPLY[@]}\"")
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return sorted(filter(None, result.stdout.splitlines()))


def test_completion_scripts_complete_verbs_flags_and_choices(tmp_path, capsys):
    assert main(["completion", "bash"]) == 0
    script = tmp_path / "minimind.bash"
    script.write_text(capsys.readouterr().out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert complete(script, "pre") == ["prepare", "pretrain"]
    assert complete(script, "pretrain", "--warm") == ["--warmup-steps"]
    assert complete(script, "pretrain", "--dtype", "") == ["auto", "bf16", "fp16", "fp32"]
    assert complete(script, "completion", "") == ["bash", "tcsh", "zsh"]
    assert main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert zsh.startswith("#compdef minimind") and "--warmup-steps" in zsh and "serve" in zsh
    with pytest.raises(SystemExit) as exited:
        main(["completion", "fish"])
    assert exited.value.code == 2


# ---- --dtype long names ------------------------------------------------------------------------------------

def test_dtype_takes_torch_names_and_records_the_short_ones():
    train = ["--data", "d", "--out", "o", "--tokenizer", "t"]
    for long, short in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"), ("bf16", "bf16")):
        assert build_parser("pretrain").parse_args([*train, "--dtype", long]).dtype == short
        assert build_parser("generate").parse_args(["--model", "m", "--dtype", long, "--prompt", "hi"]).dtype == short
        assert build_parser("info").parse_args(["--dtype", long]).dtype == short
    with pytest.raises(SystemExit) as exited:
        build_parser("sft").parse_args([*train, "--init", "m", "--dtype", "int4"])
    assert exited.value.code == 2


# ---- the warmup default follows the run's length ------------------------------------------------------------

def config_of(verb: str, *flags: str) -> TrainConfig:
    from minimind.train.args import config_from_args

    needs = ["--data", "d", "--out", "o"] + (["--tokenizer", "t"] if verb == "pretrain" else ["--init", "m"])
    return config_from_args(build_parser(verb).parse_args([*needs, *flags]), verb)


def test_default_warmup_is_a_capped_fraction_of_the_run_and_a_given_value_wins():
    pretrain = config_of("pretrain")
    assert [pretrain.warmup_for(n) for n in (40, 1000, 100_000)] == [2, 50, 500]  # 5%, at most 500
    for verb in ("sft", "lora", "distill"):
        config = config_of(verb)
        assert [config.warmup_for(n) for n in (40, 1000, 100_000)] == [1, 30, 100], verb  # 3%, at most 100
    assert config_of("pretrain", "--warmup-steps", "7").warmup_for(100_000) == 7
    assert config_of("sft", "--warmup-steps", "0").warmup_for(100_000) == 0
    assert config_of("grpo").warmup_for(100_000) == 0  # RL stages warm up only when asked
    help_ = " ".join(build_parser("pretrain").format_help().split())
    assert "by default 5% of the run's optimizer steps, at most 500" in help_


@pytest.mark.slow
def test_a_short_run_warms_up_for_a_share_of_its_steps_and_resumes_on_the_same_schedule(tmp_path, corpus_file,
                                                                                      tokenizer_dir):
    from test_train import TINY

    def run(out: Path, *extra: str) -> int:
        return main(["pretrain", "--data", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     *TINY, "--max-seq-len", "32", "--batch-size", "4", "--max-steps", "40", "--device", "cpu",
                     "--dtype", "float32", "--log-every", "1", *extra])

    out = tmp_path / "run"
    assert run(out, "--stop-after-steps", "20") == 0
    assert run(out, "--resume") == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["warmup_steps"] == 2 and config["dtype"] == "fp32"  # resolved values, as a replay needs them
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == list(range(1, 41))
    for step, lr in lrs.items():  # one schedule across the interruption: warmup 2 of 40, then the cosine
        assert lr == pytest.approx(lr_at(step - 1, 40, 1e-3, 2)), step
    assert lrs[1] == pytest.approx(0.5e-3)  # the old fixed default (500) started a 40-step run at 1/500 of it
