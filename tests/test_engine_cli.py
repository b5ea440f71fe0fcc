"""`minimind generate` end to end: the printed completion is the Engine's, errors are one line with exit 2."""

from __future__ import annotations

import io
import subprocess
import sys

from minimind.cli import main
from minimind.infer import Engine


def test_generate_subprocess_prints_the_engine_completion_and_speed(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "minimind", "generate", "--model", str(model_dir), "--prompt", "北京是",
         "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    expected = Engine.from_pretrained(model_dir).generate("北京是", max_new_tokens=8)
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "8 generated" in result.stderr


def test_generate_chat_mode_with_prompt_from_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好"))
    code = main(["generate", "--model", str(model_dir), "--prompt", "-", "--chat", "--system", "Be brief.",
                 "--temperature", "0", "--max-new-tokens", "6", "--stop", "。"])
    assert code == 0
    engine = Engine.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    assert capsys.readouterr().out == engine.chat(messages, max_new_tokens=6, stop=["。"]) + "\n"


def test_sampling_defaults_come_from_generation_config(model_dir, capsys):
    # the fixture's generation_config.json samples (temperature 0.85); with a seed the output repeats
    args = ["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    engine = Engine.from_pretrained(model_dir)
    assert first == engine.generate("hi", max_new_tokens=12, seed=3, temperature=0.85, top_p=0.85) + "\n"


def test_generate_errors_are_one_line_with_exit_2(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such model directory" in err
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_p" in err


def test_generate_constrained_output(model_dir, tmp_path, capsys):
    import json
    import re

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    base = ["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "40", "--seed", "1"]
    assert main([*base, "--json-schema", str(tmp_path / "schema.json")]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["n"] <= 99
    assert main([*base, "--regex", "[a-c]{4}"]) == 0
    assert re.fullmatch("[a-c]{4}\n", capsys.readouterr().out)
    (tmp_path / "bad.json").write_text("[1]")
    for bad, reason in ((["--json-schema", str(tmp_path / "bad.json")], "a JSON schema is an object"),
                        (["--json-schema", str(tmp_path / "none.json")], "not a readable JSON schema"),
                        (["--regex", "(["], "the output grammar is invalid")):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1
