"""Tokenizer training, special tokens, chat template and lossless round-trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from minimind.errors import UserError
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT
from minimind.tokenizer.train import save_tokenizer, texts_from_jsonl, train_tokenizer


def test_special_ids_and_exact_vocab(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]


def test_chat_template_lives_in_tokenizer_config_and_renders_seed_format(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in config
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "你是谁？"},
            {"role": "assistant", "content": "我是AI"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<s>system\nS</s>\n<s>user\n你是谁？</s>\n<s>assistant\n我是AI</s>\n"
    )
    prompt = tok.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<s>system\n{DEFAULT_SYSTEM_PROMPT}</s>\n<s>user\n你是谁？</s>\n<s>assistant\n"


def test_reasoning_content_shown_or_hidden(tokenizer):
    chat = [{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2", "reasoning_content": "one plus one"}]
    shown = tokenizer.apply_chat_template(chat, tokenize=False)
    assert "<think>one plus one</think><answer>2</answer></s>" in shown
    hidden = tokenizer.apply_chat_template(chat, tokenize=False, show_thinking=False)
    assert "<think>" not in hidden and "<s>assistant\n2</s>" in hidden


SAMPLES = ["", "hello world", "中文、标点，和 English mixed.", "emoji 🎉🧑‍🚀✨ and ZWJ", "tabs\tnew\nlines\r\n",
           "<s> looks special </s>", "日本語テキスト 한국어 العربية", "\u0000 control \u001f chars", "  leading spaces"]


@pytest.mark.parametrize("text", SAMPLES)
def test_lossless_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert 0 not in ids  # byte-level: nothing is ever <unk>


def test_errors_on_empty_and_malformed_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        list(texts_from_jsonl(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        train_tokenizer(texts_from_jsonl(bad), vocab_size=300, show_progress=False)


def test_too_small_corpus_for_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="only supports"):
        train_tokenizer(["ab ab ab"], vocab_size=2000, show_progress=False)


def test_cli_trains_a_loadable_tokenizer(tmp_path, corpus_file):
    out = tmp_path / "tok"
    result = subprocess.run([sys.executable, "-m", "minimind", "tokenizer", "--data", str(corpus_file),
                             "--vocab-size", "400", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(AutoTokenizer.from_pretrained(str(out))) == 400
    missing = subprocess.run([sys.executable, "-m", "minimind", "tokenizer", "--data", str(tmp_path / "nope.jsonl"),
                              "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.jsonl: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_saved_tokenizer_roundtrips_through_save_tokenizer(tmp_path):
    tok = train_tokenizer(["some text to learn from, 一些文本"] * 50, vocab_size=280, show_progress=False)
    save_tokenizer(tok, tmp_path)
    assert len(AutoTokenizer.from_pretrained(str(tmp_path))) == 280
