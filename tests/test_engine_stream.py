"""Streaming: whole UTF-8 characters only, stop strings cut exactly and never half-emitted, early close."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from minimind.infer import Engine
from minimind.infer.text import MAX_PENDING, TextStream, held_back

CHINESE = "北京是中国的首都。龘龍鼎 ok 🎉"  # 龘龍鼎 are not in the fixture vocab: 3 byte tokens each


class ScriptedModel(nn.Module):
    """A real tiny model (so the cache is exercised) whose greedy choice is forced to follow a script.

    For a prompt of `prompt_len` tokens, the token generated at position prompt_len + i is script[i]; after
    the script comes eos.
    """

    def __init__(self, script: list[int], prompt_len: int, eos: int):
        super().__init__()
        self.inner = tiny_model()
        self.config = self.inner.config
        self.script, self.prompt_len, self.eos = script, prompt_len, eos

    def forward(self, input_ids, position_ids, **kwargs):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)
        step = (position_ids[:, -1] + 1 - self.prompt_len).tolist()
        forced = [self.script[s] if s < len(self.script) else self.eos for s in step]
        out.logits[torch.arange(len(forced)), -1, forced] += 1e4
        return out


def scripted_engine(tokenizer, text: str, prompt: list[int]) -> Engine:
    script = tokenizer.encode(text, add_special_tokens=False)
    return Engine(ScriptedModel(script, len(prompt), tokenizer.eos_token_id), tokenizer)


PROMPT = [1, 40, 41, 42]


def test_chinese_split_over_byte_tokens_streams_whole_characters(tokenizer):
    engine = scripted_engine(tokenizer, CHINESE, PROMPT)
    script_len = len(tokenizer.encode(CHINESE, add_special_tokens=False))
    chunks = list(engine.stream(PROMPT, max_new_tokens=100))
    assert "".join(chunks) == CHINESE
    assert all(chunks) and not any("\ufffd" in c for c in chunks)
    assert "龘" in chunks and "龍" in chunks  # each came out once its third byte arrived
    assert len(chunks) >= 6
    assert engine.last_stats.finish_reasons == ["stop"] and engine.last_stats.completion_tokens == [script_len + 1]
    assert engine.generate(PROMPT, max_new_tokens=100) == CHINESE


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tokenizer):
    engine = scripted_engine(tokenizer, "ok 龘", PROMPT)
    n = len(tokenizer.encode("ok 龘", add_special_tokens=False))
    chunks = list(engine.stream(PROMPT, max_new_tokens=n - 1))  # stop one byte short
    assert "".join(chunks) == "ok \ufffd" and chunks[-1] == "\ufffd"
    assert engine.last_stats.finish_reasons == ["length"]


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello STOP world", ["STOP"], "Hello "),  # a stop string spanning four tokens
        ("Hello STOP world", ["world", "TO"], "Hello S"),  # the earliest match wins
        ("Hello STOP world", ["STOPX"], "Hello STOP world"),  # a prefix that never completes is released
        (CHINESE, ["龍"], "北京是中国的首都。龘"),  # a stop string inside split bytes
        ("a STOP b", ["P b"], "a STO"),  # the stop ends inside a multi-character token
    ],
)
def test_stop_strings_cut_exactly_and_stream_never_takes_text_back(tokenizer, text, stop, expected):
    engine = scripted_engine(tokenizer, text, PROMPT)
    chunks = list(engine.stream(PROMPT, max_new_tokens=100, stop=stop))
    assert "".join(chunks) == expected
    assert engine.generate(PROMPT, max_new_tokens=100, stop=stop) == expected
    assert engine.last_stats.finish_reasons == ["stop"]  # a stop string, or eos after the script


def test_stop_counts_tokens_up_to_the_one_completing_the_stop(tokenizer):
    engine = scripted_engine(tokenizer, "Hello STOP world", PROMPT)
    result = engine.completions([PROMPT], max_new_tokens=100, stop="STOP")[0]
    ids = tokenizer.encode("Hello STOP", add_special_tokens=False)
    assert result.token_ids == ids and result.finish_reason == "stop"


def test_stream_equals_generate_on_a_random_model_with_sampling(tokenizer):
    engine = Engine(tiny_model(3), tokenizer)
    for prompt in ("北京", "MiniMind is", "🎉"):
        kwargs = dict(max_new_tokens=30, temperature=1.0, seed=5, stop=["a"])
        assert "".join(engine.stream(prompt, **kwargs)) == engine.generate(prompt, **kwargs)


def test_closing_a_stream_early_cancels_the_request(tokenizer):
    engine = scripted_engine(tokenizer, CHINESE, PROMPT)
    stream = engine.stream(PROMPT, max_new_tokens=100)
    assert next(stream) == "北京是中国的首都"
    assert engine.has_work
    stream.close()
    assert not engine.has_work
    assert engine.generate(PROMPT, max_new_tokens=100) == CHINESE  # and the engine is reusable


def test_held_back_is_longest_suffix_that_starts_a_stop():
    assert held_back("abc S", ["STOP"]) == 1
    assert held_back("abc ST", ["STOP", "T!"]) == 2
    assert held_back("abc STO", ["XY"]) == 0
    assert held_back("", ["STOP"]) == 0


def test_text_stream_deltas_concatenate_to_text(tokenizer):
    ids = tokenizer.encode(CHINESE, add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["ok"])
    pieces = []
    for token in ids:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text == "北京是中国的首都。龘龍鼎 "


def test_text_stream_stays_o1_per_token_on_bytes_that_never_form_characters(tokenizer):
    """A small model can emit lone UTF-8 continuation bytes for ever: the decode window stays bounded and the
    text is what decoding everything at once gives (each invalid byte as U+FFFD), valid text included."""
    junk = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd"][:3]
    assert junk
    ids = [junk[i % 3] for i in range(150)] + tokenizer.encode(CHINESE, add_special_tokens=False) + junk * 40
    stream = TextStream(tokenizer)
    windows = []
    decode = stream._decode
    stream._decode = lambda window: windows.append(len(window)) or decode(window)
    text = "".join(stream.push(token)[0] for token in ids) + stream.finish()
    assert text == stream.text == tokenizer.decode(ids) and CHINESE in text
    assert max(windows) <= MAX_PENDING + 2
