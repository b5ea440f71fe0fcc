"""Shared fixtures: tiny configs, a tiny trained tokenizer, a tiny saved model directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from minimind.model import MiniMindConfig, MiniMindForCausalLM

# Property tests (hypothesis, and schemathesis on top of it) are derandomised: the same examples on every run, so
# a red CI reproduces. `--hypothesis-profile explore` (or HYPOTHESIS_PROFILE=explore) draws fresh examples.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SAMPLE_TEXT = [
    "MiniMind is a small language model trained from scratch. 12 plus 30 equals 42.",
    "我是MiniMind，一个从零训练的小型语言模型。北京是中国的首都。",
    "The capital of France is Paris. 法国的首都是巴黎。 🎉 emoji too ✨",
    "def add(a, b):\n    return a + b  # code, tabs\tand spaces",
]


_SPAWNED: list[subprocess.Popen] = []


def spawn(command: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen`, but the process dies with the test that started it (stopped at its teardown)."""
    proc = subprocess.Popen(command, **kwargs)
    _SPAWNED.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM (to its whole process group when it leads one, e.g. torchrun and its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        group = False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(autouse=True)
def _spawned_processes_die_with_the_test():
    yield
    while _SPAWNED:
        stop(_SPAWNED.pop())


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
