"""Shared fixtures: tiny configs, a tiny trained tokenizer, a tiny saved model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minimind.model import MiniMindConfig, MiniMindForCausalLM

SAMPLE_TEXT = [
    "MiniMind is a small language model trained from scratch. 12 plus 30 equals 42.",
    "我是MiniMind，一个从零训练的小型语言模型。北京是中国的首都。",
    "The capital of France is Paris. 法国的首都是巴黎。 🎉 emoji too ✨",
    "def add(a, b):\n    return a + b  # code, tabs\tand spaces",
]


def tiny_config(**overrides) -> MiniMindConfig:
    """A model small enough to run anything in milliseconds on CPU."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256)
    return MiniMindConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(400):
            for text in SAMPLE_TEXT:
                handle.write(json.dumps({"text": f"{text} #{i}"}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    from minimind.tokenizer.train import save_tokenizer, texts_from_jsonl, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(texts_from_jsonl(corpus_file), vocab_size=512, show_progress=False), out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from minimind.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    from minimind.model.hub import save_model_dir

    out = tmp_path_factory.mktemp("model")
    save_model_dir(tiny_model(), tokenizer, out)
    return out
