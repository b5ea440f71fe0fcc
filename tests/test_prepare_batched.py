"""`minimind prepare` reads blocks of whole lines and tokenizes pretraining text in batches: the shard files are
byte for byte what tokenizing record by record writes, line numbers in errors stay right, and the block reader
splits a file exactly as iterating it does."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from minimind.data import prepare as prepare_module
from minimind.data.prepare import prepare, tokenize_record
from minimind.data.shards import ShardWriter
from minimind.demo_data import demo_file
from minimind.errors import UserError
from minimind.records import ReadStats, read_records
from minimind.sources import iter_items, line_blocks, split_lines
from minimind.tokenizer import TextEncoder, encode_texts

ODD_TEXTS = [
    "plain text, then <s> and </s> and <unk> written out as text",
    "<|im_start|>user\nhi<|im_end|> and <think>x</think> as plain text",
    "carriage\rreturn, tab\t, emoji 🎉, 中文，and a trailing space ",
    "  leading spaces and\n\nblank lines inside\n",
]


def reference_shard(tokenizer, data: Path, kind: str, out: Path) -> None:
    """The shard files as tokenizing each record alone (the tokenizer's own call) and adding it writes them."""
    writer = ShardWriter(out, kind, vocab_size=len(tokenizer), with_mask=kind in ("sft", "dpo"),
                         with_extra=kind == "rlaif")
    for record in read_records(data, kind):
        for ids, mask, extra in tokenize_record(tokenizer, kind, record):
            writer.add(ids, mask, extra)
    writer.close()


def same_files(a: Path, b: Path) -> None:
    for name in ("tokens.bin", "index.bin", "mask.bin", "extra.jsonl"):
        assert (a / name).exists() == (b / name).exists(), name
        if (a / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def head_lines(source: Path, n: int, out: Path) -> Path:
    with open(source, encoding="utf-8") as handle:
        out.write_text("".join(next(handle) for _ in range(n)), encoding="utf-8")
    return out


@pytest.mark.parametrize("kind, source, lines", [
    ("pretrain", "pretrain.jsonl", 300),
    ("sft", "sft.jsonl", 40),
    ("dpo", "dpo.jsonl", 20),
    ("rlaif", "rlaif.jsonl", 20),
])
def test_prepared_files_equal_tokenizing_record_by_record(tmp_path, tokenizer, tokenizer_dir, monkeypatch, kind,
                                                          source, lines):
    data = head_lines(demo_file(source), lines, tmp_path / f"{kind}.jsonl")
    if kind == "pretrain":
        with open(data, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in ODD_TEXTS)
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 4096)  # many blocks, so their seams are crossed
    reference_shard(tokenizer, data, kind, tmp_path / "reference")
    prepare(data, tokenizer_dir, kind, tmp_path / "prepared", workers=0, progress=False)
    same_files(tmp_path / "prepared", tmp_path / "reference")


def test_worker_processes_write_the_same_files(tmp_path, tokenizer, tokenizer_dir, corpus_file):
    reference_shard(tokenizer, corpus_file, "pretrain", tmp_path / "reference")
    meta = prepare(corpus_file, tokenizer_dir, "pretrain", tmp_path / "prepared", workers=2, progress=False)
    same_files(tmp_path / "prepared", tmp_path / "reference")
    assert meta["records"] == meta["n_samples"] == sum(1 for _ in read_records(corpus_file, "pretrain"))


def test_text_encoder_gives_the_tokenizers_own_ids(tokenizer):
    texts = ODD_TEXTS + ["MiniMind 是一个小模型。", "x" * 5000, ""]
    backend = TextEncoder.of(tokenizer).load()
    assert encode_texts(backend, texts) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_bad_lines_are_named_by_file_line_across_blocks(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 256)
    lines = [json.dumps({"text": f"document number {i} " * 3}) for i in range(60)]
    lines[41] = '{"text": "unterminated'
    lines[52] = '{"no_text": 1}'
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^{data}:42: not valid JSON"):
        prepare(data, tokenizer_dir, "pretrain", tmp_path / "out", workers=0, progress=False)
    meta = prepare(data, tokenizer_dir, "pretrain", tmp_path / "skipped", workers=0, skip_bad_lines=True,
                   progress=False)
    assert meta["records"] == 58 and meta["skipped_lines"] == 2
    assert meta["skipped_examples"][0].startswith("line 42: not valid JSON")
    assert meta["skipped_examples"][1] == 'line 53: missing field "text"'


@pytest.mark.parametrize("compress", [False, True])
def test_line_blocks_split_a_file_as_iterating_it_does(tmp_path, compress):
    lines = [b'{"text": "a"}', b"", b'{"text": "crlf"}\r', b"  ", b"x" * 3000, b'{"text": "\\u00e9"}', b"last"]
    payload = b"\n".join(lines)  # no newline after the last line
    path = tmp_path / ("data.jsonl.gz" if compress else "data.jsonl")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    for block_bytes in (1, 7, 64, 1 << 20):
        numbered = [(first + i, line) for first, block in line_blocks(str(path), block_bytes)
                    for i, line in enumerate(split_lines(block))]
        assert numbered == [(n, raw.rstrip(b"\n")) for _, n, raw in iter_items(path)], block_bytes
    assert [line for _, line in numbered] == lines


def test_add_many_writes_what_add_writes(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 500, n).tolist(), rng.integers(0, 2, n).tolist(), {"n": int(n)})
               for n in (3, 1, 7, 0, 4)]
    one = ShardWriter(tmp_path / "one", "rlaif", vocab_size=500, with_mask=True, with_extra=True)
    for ids, mask, extra in samples:
        one.add(ids, mask, extra)
    many = ShardWriter(tmp_path / "many", "rlaif", vocab_size=500, with_mask=True, with_extra=True)
    many.add_many(np.array(sum((s[0] for s in samples), [])), np.array([len(s[0]) for s in samples]),
                  np.array(sum((s[1] for s in samples), [])), [s[2] for s in samples])
    assert one.close() == many.close()
    same_files(tmp_path / "one", tmp_path / "many")


def test_read_stats_unchanged_by_blocks(tmp_path, tokenizer_dir):
    """Blank lines are neither records nor bad lines, whichever block they fall in."""
    data = tmp_path / "blank.jsonl"
    data.write_text('{"text": "one"}\n\n   \n{"text": "two"}\n')
    meta = prepare(data, tokenizer_dir, "pretrain", tmp_path / "out", workers=0, progress=False)
    stats = ReadStats()
    assert len(list(read_records(data, "pretrain", stats=stats))) == meta["records"] == 2
