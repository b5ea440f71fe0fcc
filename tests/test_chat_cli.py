"""`minimind chat`: multi-turn history through the template, /reset, /exit, EOF, --history-turns."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest
from thinking_helpers import save_thinking_template, with_thinking_template

from minimind.infer import Engine
from minimind.infer.chat_cli import BANNER, HELP, MODEL_PROMPT, NO_SWITCH, build_prompt, chat_loop


def scripted_input(lines: list[str]):
    """A `read_line` that returns the lines in turn, then raises EOFError like `input` at end of input."""
    pending = list(lines)

    def read_line(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read_line


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir)


SAMPLING = {"temperature": 0.0, "max_new_tokens": 5}


def test_chat_loop_keeps_history_and_reset_forgets_it(engine):
    out = io.StringIO()
    code = chat_loop(engine, scripted_input(["hi", "", "tell me more", "/reset", "hi", "/exit", "never read"]),
                     out, system="Be kind.", sampling=SAMPLING)
    assert code == 0
    system = [{"role": "system", "content": "Be kind."}]
    first = engine.chat(system + [{"role": "user", "content": "hi"}], **SAMPLING)
    second = engine.chat(system + [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                                   {"role": "user", "content": "tell me more"}], **SAMPLING)
    expected = (f"{BANNER}\n{MODEL_PROMPT}{first}\n{MODEL_PROMPT}{second}\n(conversation cleared)\n"
                f"{MODEL_PROMPT}{first}\n")
    assert out.getvalue() == expected


@pytest.mark.parametrize("ending", [EOFError, KeyboardInterrupt])
def test_chat_loop_ends_cleanly_on_eof_and_ctrl_c(engine, ending):
    def read_line(prompt: str) -> str:
        raise ending

    out = io.StringIO()
    assert chat_loop(engine, read_line, out, sampling=SAMPLING) == 0
    assert out.getvalue() == BANNER + "\n\n"


def test_history_turns_limits_the_pairs_sent(engine):
    history = [("a", "b"), ("c", "d"), ("e", "f")]
    two = build_prompt(engine, None, history, "g", history_turns=2, max_new_tokens=5)
    messages = [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"},
                {"role": "user", "content": "g"}]
    assert two == engine.chat_prompt(messages)
    assert build_prompt(engine, None, history, "g", 0, 5) == engine.chat_prompt([{"role": "user", "content": "g"}])
    assert build_prompt(engine, None, history, "g", -1, 5) == build_prompt(engine, None, history, "g", 3, 5)


def test_history_is_trimmed_to_the_context_and_too_long_messages_are_refused(engine):
    pairs = [("x" * 40, "y" * 40), ("u" * 40, "v" * 40), ("s" * 40, "t" * 40)]  # ~90 tokens a pair
    ids = build_prompt(engine, None, pairs, "hi", -1, max_new_tokens=32)
    # 256-token context, 32 kept for the answer: only the newest pair still fits
    assert ids == build_prompt(engine, None, pairs[-1:], "hi", -1, 32)
    assert len(ids) + 32 <= engine.max_seq_len < len(build_prompt(engine, None, pairs[-2:], "hi", -1, 0)) + 32
    assert build_prompt(engine, None, [], "z" * 400, -1, 32) is None
    out = io.StringIO()
    chat_loop(engine, scripted_input(["z" * 400]), out, sampling=SAMPLING)
    assert "message too long" in out.getvalue()


def test_chat_subprocess_streams_answers_and_quits_on_exit(model_dir, engine):
    result = subprocess.run(
        [sys.executable, "-m", "minimind", "chat", "--model", str(model_dir), "--temperature", "0",
         "--max-new-tokens", "4", "--device", "cpu", "--history-turns", "0"],
        input="hi\nhello\n/exit\n", capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    for message in ("hi", "hello"):  # with no history each answer is the single-turn one
        answer = engine.chat([{"role": "user", "content": message}], temperature=0.0, max_new_tokens=4)
        assert f"{MODEL_PROMPT}{answer}\n" in result.stdout
    assert result.stdout.count(MODEL_PROMPT) == 2


@pytest.mark.slow
def test_chat_with_compile_compiles_before_the_first_message(model_dir, engine):
    result = subprocess.run(
        [sys.executable, "-m", "minimind", "chat", "--model", str(model_dir), "--temperature", "0",
         "--max-new-tokens", "4", "--device", "cpu", "--compile", "--history-turns", "0"],
        input="hi\nhello\n/exit\n", capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "compiling the decode step" in result.stderr and "compiled in" in result.stderr
    assert result.stdout.count(MODEL_PROMPT) == 2
    for message in ("hi", "hello"):  # the compiled step answers as the eager engine does
        answer = engine.chat([{"role": "user", "content": message}], temperature=0.0, max_new_tokens=4)
        assert f"{MODEL_PROMPT}{answer}\n" in result.stdout


@pytest.mark.parametrize("pieces, printed, answer", [
    (["<th", "ink>plan the", " sum</thi", "nk><ans", "wer>4", "2</answer>"], "(thinking…) 42", "42"),
    (["<think>only thoughts, cut off"], "(thinking…) ", ""),
    (["Hel", "lo <", "b> and </", "p"], "Hello <b> and </p", "Hello <b> and </p"),
])
def test_hide_thinking_prints_only_the_answer_however_the_tags_are_split(pieces, printed, answer):
    from minimind.infer.chat_cli import AnswerOnly

    shown = AnswerOnly()
    assert "".join(shown.push(p) for p in pieces) + shown.finish() == printed
    assert shown.answer() == answer


def test_chat_loop_with_hide_thinking_keeps_answers_only_in_the_history():
    class ThinkingEngine:
        max_seq_len = 512

        def __init__(self):
            self.prompts = []

        def chat_prompt(self, messages):
            self.prompts.append(messages)
            return [1, 2, 3]

        def stream(self, ids, **sampling):
            yield from ["<think>", "hmm", "</think>", "<answer>", "yes", "</answer>"]

    engine, out = ThinkingEngine(), io.StringIO()
    assert chat_loop(engine, scripted_input(["q1", "q2"]), out, hide_thinking=True) == 0
    assert out.getvalue().count(MODEL_PROMPT + "(thinking…) yes\n") == 2 and "hmm" not in out.getvalue()
    assert engine.prompts[1] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "yes"},
                                 {"role": "user", "content": "q2"}]


class ScriptedEngine:
    """Renders prompts with a real tokenizer, records the template arguments, and answers with fixed pieces."""

    max_seq_len = 512

    def __init__(self, tokenizer, pieces: list[str]):
        self.tokenizer, self.pieces, self.prompts = tokenizer, pieces, []

    def chat_prompt(self, messages, **template_kwargs):
        self.prompts.append((messages, template_kwargs))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, ids, **sampling):
        yield from self.pieces


THOUGHT = ["two and", " two</th", "ink>\n\nIt is", " 4."]  # a reply inside the think block the prompt opened


@pytest.mark.parametrize("hide", [False, True])
def test_think_toggle_opens_the_think_block_and_keeps_answers_only(tokenizer, hide):
    engine = ScriptedEngine(with_thinking_template(tokenizer), THOUGHT)
    out = io.StringIO()
    lines = ["/help", "q1", "/think", "q2", "q3", "/think", "q4"]
    assert chat_loop(engine, scripted_input(lines), out, hide_thinking=hide) == 0
    assert [kwargs for _, kwargs in engine.prompts] == [
        {}, {"open_thinking": True, "enable_thinking": True}, {"open_thinking": True, "enable_thinking": True},
        {"open_thinking": False, "enable_thinking": False}]
    text = out.getvalue()
    assert HELP in text and "/think" in HELP and NO_SWITCH not in text
    assert text.count("(thinking on)\n") == 1 and text.count("(thinking off)\n") == 1
    shown = "(thinking…) It is 4." if hide else "<think>two and two</think>\n\nIt is 4."
    assert text.count(MODEL_PROMPT + shown + "\n") == 2  # q2 and q3, with thinking on
    # with thinking on, earlier answers go back without their thinking
    messages, _ = engine.prompts[2]
    assert messages[3] == {"role": "assistant", "content": "It is 4."}


def test_think_with_a_template_without_the_switch_warns_once_and_goes_on(tokenizer):
    engine = ScriptedEngine(tokenizer, ["hello"])
    out = io.StringIO()
    assert chat_loop(engine, scripted_input(["/think", "q1"]), out) == 0
    assert out.getvalue().count(NO_SWITCH + "\n") == 1 and MODEL_PROMPT + "hello\n" in out.getvalue()
    assert engine.prompts[0][1] == {"open_thinking": True, "enable_thinking": True}  # passed on, ignored


def test_chat_and_generate_take_think(model_dir, tmp_path, monkeypatch, capsys):
    from minimind.cli import main

    monkeypatch.setattr("builtins.input", scripted_input(["hi"]))
    assert main(["chat", "--model", str(model_dir), "--think", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().err.count(NO_SWITCH) == 1
    generate = ["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                "--think"]
    assert main(generate) == 2
    assert "--think" in (err := capsys.readouterr().err) and "needs --chat" in err
    assert main([*generate, "--chat"]) == 0
    assert capsys.readouterr().err.count(NO_SWITCH) == 1
    switched = tmp_path / "switched"
    shutil.copytree(model_dir, switched)
    save_thinking_template(switched)
    assert main(["generate", "--model", str(switched), *generate[3:], "--chat"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("<think>") and NO_SWITCH not in printed.err  # the reply starts inside the block


def test_unknown_commands_and_bytes_that_are_not_utf8_are_refused_and_the_chat_goes_on(engine):
    out = io.StringIO()
    lines = ["/bogus", "/think on", "hi \udcff there", "/etc/hosts is a file", "/exit"]  # \udcff: byte 0xff as read
    assert chat_loop(engine, scripted_input(lines), out, sampling=SAMPLING) == 0
    reply = engine.chat([{"role": "user", "content": "/etc/hosts is a file"}], **SAMPLING)
    assert out.getvalue() == (f"{BANNER}\n(unknown command: /bogus; /help lists the commands)\n"
                              "(unknown command: /think on; /help lists the commands)\n"
                              "(the message is not UTF-8 text (byte 0xff at character 3); nothing sent)\n"
                              f"{MODEL_PROMPT}{reply}\n")


def test_generate_and_chat_refuse_text_that_is_not_utf8_and_flags_that_do_not_apply(model_dir, monkeypatch, capsys):
    from minimind.cli import main

    base = ["--model", str(model_dir), "--max-new-tokens", "2", "--device", "cpu"]
    for argv, message in ((["generate", *base, "--prompt", "a\udcffb"], "--prompt is not UTF-8 text (byte 0xff at "
                                                                         "character 1)"),
                          (["generate", *base, "--prompt", "hi", "--system", "S"], "--system is the chat template's "
                                                                                    "system prompt; it needs --chat"),
                          (["chat", *base, "--history-turns", "-5"], "--history-turns is -5"),
                          (["chat", *base, "--system", "\udce9t\udce9"], "--system is not UTF-8 text (byte 0xe9")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi \udcff"))
    assert main(["generate", *base, "--prompt", "-"]) == 2
    assert "the prompt on stdin is not UTF-8 text (byte 0xff at character 3)" in capsys.readouterr().err
