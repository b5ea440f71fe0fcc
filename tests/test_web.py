"""The web chat page with Streamlit's AppTest (in-process, no browser), and its helpers."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
from conftest import tiny_model
from streamlit.testing.v1 import AppTest
from thinking_helpers import save_thinking_template

from minimind.cli import main
from minimind.infer import Engine
from minimind.infer.options import PREFIX_CACHE_TOKENS
from minimind.serve.web_cli import PAGE
from minimind.serve.webchat import find_models, history_pairs, split_thinking
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT

SEED = 7


@pytest.fixture(autouse=True)
def _main_module_put_back():
    """AppTest runs the page as `__main__` and leaves it in `sys.modules`; a later test in this process that
    starts processes with multiprocessing's spawn (which re-runs `__main__` in each child) would run the page."""
    main_module = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main_module


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir, tokenizer):
    """runs/chat (the tiny model), runs/other/checkpoint (a second one, nested), runs/empty (not a model)."""
    from minimind.modeldir import save_model_dir

    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(model_dir, root / "chat")
    save_model_dir(tiny_model(seed=1), tokenizer, root / "other" / "checkpoint")
    (root / "empty").mkdir()
    return root


@pytest.fixture
def app(runs, monkeypatch) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["page.py", "--models-dir", str(runs), "--device", "cpu"])
    app = AppTest.from_file(str(PAGE), default_timeout=120)
    return app.run()


def expected_answer(model_dir, messages, seed, max_new_tokens=128, system=DEFAULT_SYSTEM_PROMPT, temperature=0.85,
                    top_p=0.85, **template_kwargs):
    """What the page should answer with `seed` and its default settings (from generation_config.json) or those
    given."""
    engine = Engine.from_pretrained(model_dir)
    ids = engine.chat_prompt([{"role": "system", "content": system}, *messages], **template_kwargs)
    assert len(ids) + min(max_new_tokens, engine.max_seq_len // 2) <= engine.max_seq_len  # history not trimmed
    return engine.completions([ids], temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                              seed=seed)[0]


def test_chat_flow_send_regenerate_clear(app, runs):
    assert not app.exception
    assert app.selectbox[0].options == ["chat", "other/checkpoint"]
    assert app.selectbox[0].value == "chat"
    app.number_input[0].set_value(SEED).run()
    next(s for s in app.slider if s.label == "Max new tokens").set_value(16).run()
    app.chat_input[0].set_value("hello").run()
    assert not app.exception
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    assert app.chat_message[0].markdown[0].value == "hello"
    answer = app.session_state["messages"][1]
    expected = expected_answer(runs / "chat", [{"role": "user", "content": "hello"}], SEED, 16)
    assert answer["content"] == expected.text  # the settings were applied
    assert f"{expected.completion_tokens} tokens" in answer["stats"] and "tokens/s" in answer["stats"]
    assert app.chat_message[1].caption[0].value == answer["stats"]

    app.chat_input[0].set_value("more").run()  # a second turn carries the first as history
    assert [m.name for m in app.chat_message] == ["user", "assistant", "user", "assistant"]
    second = expected_answer(runs / "chat", [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": expected.text},
                                             {"role": "user", "content": "more"}], SEED, 16)
    assert app.session_state["messages"][3]["content"] == second.text

    app.number_input[0].set_value(SEED + 1).run()
    next(b for b in app.button if b.label == "Regenerate").click().run()
    assert len(app.chat_message) == 4
    assert app.session_state["messages"][3]["content"] != second.text

    next(b for b in app.button if b.label == "Clear").click().run()
    assert len(app.chat_message) == 0 and app.session_state["messages"] == []


def test_sampling_history_and_system_prompt_controls_reach_the_prompt_and_sampler(app, runs):
    sliders = {s.label: s for s in app.slider}
    app.number_input[0].set_value(SEED).run()
    sliders["Max new tokens"].set_value(12).run()
    sliders["Temperature"].set_value(1.5).run()
    sliders["Top-p"].set_value(0.5).run()
    sliders["History turns"].set_value(1).run()
    app.text_area[0].set_value("Answer in one word.").run()
    settings = {"system": "Answer in one word.", "temperature": 1.5, "top_p": 0.5}
    said = []
    for turn, question in enumerate(["hello", "more", "again"]):
        app.chat_input[0].set_value(question).run()
        assert not app.exception
        earlier = said[-2:]  # one question/answer pair of history
        expected = expected_answer(runs / "chat", [*earlier, {"role": "user", "content": question}], SEED, 12,
                                   **settings)
        reply = app.session_state["messages"][2 * turn + 1]["content"]
        assert reply == expected.text, turn
        said += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    # each setting mattered: the defaults, or the whole history, give another third answer here
    everything = expected_answer(runs / "chat", [*said[:4], {"role": "user", "content": "again"}], SEED, 12,
                                 **settings)
    defaults = expected_answer(runs / "chat", [*said[2:4], {"role": "user", "content": "again"}], SEED, 12)
    assert said[5]["content"] not in (everything.text, defaults.text)


def test_model_picker_switches_models(app, runs):
    app.number_input[0].set_value(SEED).run()
    app.selectbox[0].select("other/checkpoint").run()
    app.chat_input[0].set_value("hello").run()
    expected = expected_answer(runs / "other" / "checkpoint", [{"role": "user", "content": "hello"}], SEED)
    assert app.session_state["messages"][1]["content"] == expected.text


def test_thinking_is_folded(app):
    app.session_state["messages"] = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>one and one</think><answer>2</answer>", "stats": "3 tokens"},
    ]
    app.run()
    (expander,) = app.chat_message[1].expander
    assert expander.label == "Thinking" and expander.markdown[0].value == "one and one"
    assert [m.value for m in app.chat_message[1].markdown if m.value == "2"] == ["2"]


def test_thinking_switch(app, tmp_path, tokenizer, monkeypatch):
    (toggle,) = app.sidebar.toggle
    assert toggle.label == "Thinking" and toggle.disabled  # the seed template has no switch
    from minimind.modeldir import save_model_dir

    save_model_dir(tiny_model(), tokenizer, tmp_path / "thinker")
    save_thinking_template(tmp_path / "thinker")
    monkeypatch.setattr(sys, "argv", ["page.py", "--models-dir", str(tmp_path), "--device", "cpu"])
    page = AppTest.from_file(str(PAGE), default_timeout=120).run()
    assert not page.sidebar.toggle[0].disabled and page.sidebar.toggle[0].value is False
    page.number_input[0].set_value(SEED).run()
    next(s for s in page.slider if s.label == "Max new tokens").set_value(8).run()
    page.sidebar.toggle[0].set_value(True).run()
    page.chat_input[0].set_value("hello").run()
    assert not page.exception
    expected = expected_answer(tmp_path / "thinker", [{"role": "user", "content": "hello"}], SEED, 8,
                               open_thinking=True, enable_thinking=True)
    # the prompt opened the think block: the page keeps the reply inside it and folds it while it streams
    assert page.session_state["messages"][1]["content"] == "<think>" + expected.text
    (expander,) = page.chat_message[1].expander
    assert expander.label == "Thinking…" and "</think>" not in expected.text


def test_no_models_found_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["page.py", "--models-dir", str(tmp_path)])
    app = AppTest.from_file(str(PAGE), default_timeout=60).run()
    assert "No model directories" in app.sidebar.warning[0].value
    assert main(["web", "--models-dir", str(tmp_path / "missing")]) == 2


def test_web_passes_the_engine_flags_to_the_page(runs, monkeypatch):
    import os

    commands = []
    monkeypatch.setattr(os, "execve", lambda path, command, env: commands.append(command))
    assert main(["web", "--models-dir", str(runs), "--device", "cpu", "--dtype", "fp32", "--quantize", "int8",
                 "--compile", "--no-prepack", "--no-prefix-cache"]) == 0
    page_args = commands[0][commands[0].index("--") + 1:]
    assert page_args == ["--models-dir", str(runs.resolve()), "--device", "cpu", "--dtype", "fp32",
                         "--quantize", "int8", "--compile", "--no-prepack", "--prefix-cache-tokens", "0"]
    assert main(["web", "--models-dir", str(runs), "--prefix-cache-tokens", "64"]) == 0
    assert commands[1][-2:] == ["--prefix-cache-tokens", "64"]
    assert main(["web", "--models-dir", str(runs)]) == 0  # the default bound is the page's own default too
    assert "--prefix-cache-tokens" not in commands[2]


@pytest.mark.parametrize("flags", [[], ["--no-prefix-cache"]])
def test_the_page_reuses_the_conversation_through_the_prefix_cache(runs, monkeypatch, flags):
    from minimind.serve import webchat

    bounds = []
    real = webchat.load_scheduler
    monkeypatch.setattr(webchat, "load_scheduler", lambda *args: bounds.append(args[-1]) or real(*args))
    monkeypatch.setattr(sys, "argv", ["page.py", "--models-dir", str(runs / "chat"), "--device", "cpu",
                                      "--dtype", "fp32", *flags])  # its own scheduler: nothing cached before
    page = AppTest.from_file(str(PAGE), default_timeout=120).run()
    page.number_input[0].set_value(SEED).run()
    next(s for s in page.slider if s.label == "Max new tokens").set_value(6).run()
    page.chat_input[0].set_value("hello").run()
    page.chat_input[0].set_value("more").run()
    assert not page.exception and bounds == [0 if flags else PREFIX_CACHE_TOKENS]
    first, second = (page.session_state["messages"][i]["stats"] for i in (1, 3))
    assert "prefix cache" not in first
    reused = re.search(r"(\d+) of (\d+) prompt tokens from the prefix cache", second)
    if flags:
        assert reused is None
    else:  # the second turn's prompt starts with the first turn's: that much is not prefilled again
        assert 10 < int(reused[1]) < int(reused[2])


@pytest.mark.slow
def test_engine_flags_reach_the_web_page(runs, monkeypatch):
    from minimind.infer.layout import PackedLinear
    from minimind.infer.quantize import Int8Linear
    from minimind.serve import webchat

    scheduler = webchat.load_scheduler(str(runs / "chat"), "cpu", None, prepack=False)
    try:  # a float model: without prepack no linear layer is a PackedLinear
        assert not any(isinstance(m, PackedLinear) for m in scheduler.engine.model.modules())
        assert scheduler.engine.last_stats.completion_tokens == []  # nothing to compile, no warm-up
    finally:
        scheduler.close()
    scheduler = webchat.load_scheduler(str(runs / "chat"), "cpu", None, quantize="int8", compile=True)
    try:
        assert any(isinstance(m, Int8Linear) for m in scheduler.engine.model.modules())
        assert scheduler.engine.last_stats.completion_tokens == [2]  # warmed up (compiled) before starting
    finally:
        scheduler.close()
    # the page's flags reach load_scheduler (the page ignores flags it does not know, so check the call)
    calls = []
    real = webchat.load_scheduler
    monkeypatch.setattr(webchat, "load_scheduler", lambda *args: calls.append(args) or real(*args))
    monkeypatch.setattr(sys, "argv", ["page.py", "--models-dir", str(runs / "other"), "--device", "cpu",
                                      "--no-prepack", "--quantize", "int8", "--compile"])
    app = AppTest.from_file(str(PAGE), default_timeout=120).run()
    assert not app.exception and calls and calls[-1][-4:] == (False, "int8", True, PREFIX_CACHE_TOKENS)


def test_find_models_and_history(runs):
    assert [p.relative_to(runs).as_posix() for p in find_models(runs)] == ["chat", "other/checkpoint"]
    assert find_models(runs / "chat") == [runs / "chat"]
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>t</think>a1"},
                {"role": "user", "content": "q2"}]
    assert history_pairs(messages) == [("q1", "a1")]


@pytest.mark.parametrize("text,thinking,answer,done", [
    ("plain <b>answer</b>", None, "plain <b>answer</b>", True),
    ("<think>still going", "still going", "", False),
    ("<think>why</think><answer>because</answer>", "why", "because", True),
    ("why</think>\n<answer>because", "why", "because", True),  # the prompt opened the block
])
def test_split_thinking(text, thinking, answer, done):
    thought = split_thinking(text)
    assert (thought.thinking, thought.answer, thought.thinking_done) == (thinking, answer, done)
