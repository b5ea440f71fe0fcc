"""`minimind tokenizer --max-texts / --sample-bytes / --seed`: the trainer sees a seeded uniform sample within the
caps, drawn while streaming, and the command reports its peak memory."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from minimind.cli import main
from minimind.tokenizer import train as train_module
from minimind.tokenizer.train import byte_count, sample_texts


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "北京", "上海", "😀", "epsilon", "zeta", "theta"]
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(300):
            text = " ".join(words[(i * 7 + j) % len(words)] + str(i % (j + 3)) for j in range(5 + i % 9))
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def test_sample_keeps_both_caps_in_file_order():
    texts = [f"text {i} " + "x" * (i % 13) for i in range(1000)]
    sample = sample_texts(iter(texts), max_texts=50, seed=1)
    assert len(sample) == 50 and sample == sorted(sample, key=texts.index)
    by_bytes = sample_texts(iter(texts), max_bytes=2000, seed=1)
    assert 0 < sum(len(t.encode()) for t in by_bytes) <= 2000
    both = sample_texts(iter(texts), max_texts=10, max_bytes=10**6, seed=1)
    assert len(both) == 10
    assert sample_texts(iter(texts[:5]), max_texts=50) == texts[:5]  # fewer texts than the cap: all of them


def test_sample_is_the_same_per_seed_and_spread_over_the_input():
    texts = [str(i) for i in range(10_000)]
    first = sample_texts(iter(texts), max_texts=500, seed=7)
    assert first == sample_texts(iter(texts), max_texts=500, seed=7)
    assert first != sample_texts(iter(texts), max_texts=500, seed=8)
    quarters = Counter(int(t) * 4 // len(texts) for t in first)  # uniform: about 125 from each quarter
    assert all(90 < quarters[q] < 160 for q in range(4)), quarters


def test_byte_count_reads_suffixes():
    assert [byte_count(v) for v in ("500", "2K", "200M", "1.5G", "64mb")] == [500, 2000, 200 * 10**6, 1.5e9, 64e6]
    with pytest.raises(Exception, match="expected a size"):
        byte_count("lots")


def test_cli_trains_on_at_most_max_texts(tmp_path, corpus, monkeypatch, capsys):
    seen = []
    real = train_module.train_tokenizer

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        seen.append(texts)
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_tokenizer", spy)
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, (3, 3, 4)):
        assert main(["tokenizer", "--data", str(corpus), "--vocab-size", "300", "--max-texts", "40",
                     "--sample-bytes", "1M", "--seed", str(seed), "--out", str(out)]) == 0
    assert [len(texts) for texts in seen] == [40, 40, 40]
    assert seen[0] == seen[1] != seen[2]
    assert (outs[0] / "tokenizer.json").read_bytes() == (outs[1] / "tokenizer.json").read_bytes()
    output = capsys.readouterr().out
    assert "from 300 records (a sample of 40," in output
    peak = re.search(r"peak memory ([\d,]+) MB", output)
    assert peak and int(peak.group(1).replace(",", "")) > 0


def test_cli_sample_bytes_caps_the_text(tmp_path, corpus, monkeypatch):
    seen = []
    real = train_module.train_tokenizer
    monkeypatch.setattr(train_module, "train_tokenizer",
                        lambda texts, *a, **k: seen.append(list(texts)) or real(seen[-1], *a, **k))
    assert main(["tokenizer", "--data", str(corpus), "--vocab-size", "300", "--sample-bytes", "4K",
                 "--out", str(tmp_path / "tok")]) == 0
    assert 0 < sum(len(t.encode()) for t in seen[0]) <= 4000 and len(seen[0]) < 300


@pytest.mark.parametrize("flag", ["--max-texts", "--sample-bytes"])
def test_a_zero_cap_is_one_line(tmp_path, corpus, flag, capsys):
    assert main(["tokenizer", "--data", str(corpus), flag, "0", "--out", str(tmp_path / "tok")]) == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()
