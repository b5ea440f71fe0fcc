"""Shared fixtures: tiny configs, a tiny trained tokenizer, a tiny saved model directory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import tempfile
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

# The CLI compiles the decode step by default; tests that want it pass --compile (or compile=True), the rest
# (and the servers they spawn, which inherit this) decode eagerly instead of paying a compilation each.
os.environ.setdefault("MINIMIND_COMPILE", "0")
# ... and what they compile is kept in a directory of this run's own, not the user's ~/.cache/minimind.
os.environ["MINIMIND_CACHE"] = tempfile.mkdtemp(prefix="minimind-test-cache-")

# `make test` runs the suite in parallel processes (pytest-xdist). Each worker gets its share of the cores, and
# the processes its tests start inherit that share through OMP_NUM_THREADS, so the workers do not fight over
# cores (oversubscribed OpenMP threads spin and wait on each other, which costs more than one thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

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


SLOW_TIMEOUT = 900  # seconds; every other test has pyproject's `timeout` (300)


def pytest_collection_modifyitems(items):
    """End-to-end tests (`slow`) get a longer limit unless they name their own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(autouse=True)
def _spawned_processes_die_with_the_test():
    yield
    while _SPAWNED:
        stop(_SPAWNED.pop())


@pytest.fixture
def cli_engines(monkeypatch) -> list:
    """The Engines an in-process `minimind generate`/`chat` streams from, so a test can check its flags
    reached the engine (int8 layers, no prepacked copies), not only that the command ran."""
    from minimind.infer.engine import Engine

    seen = []
    real = Engine.stream

    def stream(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "stream", stream)
    return seen


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
    from minimind.modeldir import save_model_dir

    out = tmp_path_factory.mktemp("model")
    save_model_dir(tiny_model(), tokenizer, out)
    return out


# MiniMind2's chat template format (rendered `<s>system\n…</s>\n<s>user\n…</s>\n<s>assistant\n`, a default system
# turn of its own), in our words
MINIMIND2_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<s>system\\n' + messages[0]['content'] + '</s>\\n' }}"
    "{% else %}{{ '<s>system\\n你是 MiniMind，一个小而有用的助手。</s>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<s>user\\n' + message['content'] + '</s>\\n<s>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def minimind2_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer with the properties of MiniMind2's released one that the interop tests rely on: byte-level
    BPE, 6400 tokens (256 bytes, <unk>/<s>/</s>, 6141 merges) and a chat template of its own that is not ours.
    Trained here on seeded made-up words (Latin syllables and CJK characters) so that 6400 tokens are reachable."""
    from minimind.tokenizer.train import save_tokenizer, train_tokenizer

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    hanzi = [chr(0x4E00 + i) for i in range(300)]
    texts = [" ".join(["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(12)]
                      + ["".join(rng.choices(hanzi, k=rng.randint(1, 3))) for _ in range(4)]) for _ in range(4000)]
    out = save_tokenizer(train_tokenizer(texts, vocab_size=6400, show_progress=False),
                         tmp_path_factory.mktemp("minimind2-tokenizer"))
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = MINIMIND2_STYLE_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return out
