"""Data sources: .jsonl.gz, .jsonl.zst, Parquet (streamed by row group), a directory or glob of them, and
hf:org/name datasets, read by the one record reader every consumer uses; bad records are `file:line:` (of the
decompressed stream) or `file:row N:` errors, and `--skip-bad-lines` counts them the same way."""

from __future__ import annotations

import gzip
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from minimind.cli import main
from minimind.data.shards import Shard
from minimind.errors import UserError
from minimind.records import ReadStats, read_records
from minimind.sources import HFSource, expand
from minimind.tokenizer.train import texts_from_jsonl
from minimind.train.agent import read_agent_data

TEXTS = [f"MiniMind reads record {i} from every format." for i in range(12)]


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write(path, records: list) -> str:
    """`records` (a record or a raw str line each) in the format the file name says."""
    if path.name.endswith(".parquet"):
        # small row groups so a read crosses several of them
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=5)
        return str(path)
    lines = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)
    data = lines.encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.parquet"])
def test_every_format_reads_the_same_records(tmp_path, name):
    path = write(tmp_path / name, [{"text": t} for t in TEXTS])
    assert list(read_records(path, "pretrain")) == TEXTS
    assert list(texts_from_jsonl(path)) == TEXTS  # the tokenizer's reader too


def test_a_directory_or_glob_reads_its_files_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "a.jsonl.gz", [{"text": t} for t in TEXTS[:4]])
    write(tmp_path / "b.parquet", [{"text": t} for t in TEXTS[4:8]])
    write(tmp_path / "sub" / "c.jsonl.zst", [{"text": t} for t in TEXTS[8:]])
    (tmp_path / "notes.md").write_text("not data")
    assert list(read_records(tmp_path, "pretrain")) == TEXTS
    assert list(read_records(str(tmp_path / "**" / "*.jsonl.*"), "pretrain")) == TEXTS[:4] + TEXTS[8:]
    assert expand(str(tmp_path / "[ab].*")) == [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet")]
    with pytest.raises(UserError, match=r"no file matches"):
        expand(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: a directory with no data files"):
        expand(tmp_path / "empty")


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.jsonl.zst"])
def test_a_bad_line_in_a_compressed_file_names_its_line(tmp_path, name):
    path = write(tmp_path / name, [{"text": "fine"}, {"text": "also fine"}, "{not json", {"text": 7}])
    with pytest.raises(UserError, match=rf"^{path}:3: not valid JSON"):
        list(read_records(path, "pretrain"))
    stats = ReadStats()
    assert list(read_records(path, "pretrain", skip_bad_lines=True, stats=stats)) == ["fine", "also fine"]
    assert stats.skipped == 2 and stats.examples[0].startswith("line 3: not valid JSON")


def test_a_damaged_compressed_stream_is_one_line(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes([{"text": t} for t in TEXTS]))[:-12])
    with pytest.raises(UserError, match=rf"^{path}:\d+: the compressed stream is damaged"):
        list(read_records(path, "pretrain"))


def test_a_bad_parquet_row_names_its_row(tmp_path):
    path = write(tmp_path / "d.parquet", [{"text": t} for t in TEXTS[:6]] + [{"text": ""}] + [{"text": "end"}])
    with pytest.raises(UserError, match=rf'^{path}:row 7: field "text" is empty'):
        list(read_records(path, "pretrain"))
    stats = ReadStats()
    assert len(list(read_records(path, "pretrain", skip_bad_lines=True, stats=stats))) == 7
    assert stats.examples == ['row 7: field "text" is empty']
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"junk.parquet: not a readable Parquet file"):
        list(read_records(tmp_path / "junk.parquet", "pretrain"))


def test_parquet_chat_rows_read_as_conversations(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write(tmp_path / "sft.parquet", [{"conversations": turns}] * 3)
    assert list(read_records(path, "sft")) == [turns] * 3
    agent = [{"conversations": turns, "gt": ["hello"]}] * 2
    assert [r["gt"] for r in read_agent_data(write(tmp_path / "agent.jsonl.zst", agent))] == [["hello"]] * 2


@pytest.mark.slow
def test_prepare_reads_every_format_with_its_workers(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "a.parquet", [{"text": t} for t in TEXTS[:6]])
    write(tmp_path / "in" / "b.jsonl.zst", [{"text": t} for t in TEXTS[6:]] + ['{"text": ""}'])
    args = ["prepare", "--data", str(tmp_path / "in"), "--tokenizer", str(tokenizer_dir)]
    assert main([*args, "--workers", "0", "--out", str(tmp_path / "strict")]) == 2
    assert f"{tmp_path / 'in' / 'b.jsonl.zst'}:7: field \"text\" is empty" in capsys.readouterr().err
    assert main([*args, "--workers", "1", "--out", str(tmp_path / "out"), "--skip-bad-lines"]) == 0
    meta = Shard(tmp_path / "out").meta
    assert meta["records"] == len(TEXTS) and meta["skipped_lines"] == 1
    plain = tmp_path / "plain.jsonl"
    write(plain, [{"text": t} for t in TEXTS])
    assert main(["prepare", "--data", str(plain), "--tokenizer", str(tokenizer_dir), "--workers", "0",
                 "--out", str(tmp_path / "plain")]) == 0
    assert Shard(tmp_path / "plain").tokens().tolist() == Shard(tmp_path / "out").tokens().tolist()


def test_hf_sources_stream_through_datasets(tmp_path, monkeypatch):
    import datasets

    local = write(tmp_path / "local.jsonl", [{"text": t} for t in TEXTS])
    real = datasets.load_dataset
    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return real("json", data_files=local, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(read_records("hf:jingyaogong/minimind_dataset:pretrain_hq.jsonl", "pretrain")) == TEXTS
    assert calls[-1] == ("jingyaogong/minimind_dataset", None,
                         {"data_files": "pretrain_hq.jsonl", "split": "train", "streaming": True})
    list(read_records("hf:org/name:zh:validation", "pretrain"))
    assert calls[-1] == ("org/name", "zh", {"data_files": None, "split": "validation", "streaming": True})
    assert HFSource.parse("hf:org/name") == HFSource("org/name")
    with pytest.raises(UserError, match=r"^hf:nameonly: expected hf:ORG/NAME"):
        expand("hf:nameonly")

    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'org/none' doesn't exist on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(UserError, match=r"^hf:org/none: cannot open the dataset \(Dataset 'org/none' doesn't exist"):
        list(read_records("hf:org/none", "pretrain"))


@pytest.mark.slow
def test_training_reads_a_directory_and_parquet_eval_data(tmp_path, tokenizer_dir, corpus_file, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = corpus_file.read_bytes().splitlines(keepends=True)
    (data / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:600]) + b'{"text": ""}\n'))
    (data / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[600:1200])))
    held_out = write(tmp_path / "held.parquet", [json.loads(line) for line in lines[1200:1300]])
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--eval-data", held_out, "--tokenizer", str(tokenizer_dir),
                 "--preset", "tiny", "--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2",
                 "--set", "n_kv_heads=1", "--max-seq-len", "32", "--batch-size", "2", "--max-steps", "2",
                 "--device", "cpu", "--dtype", "fp32", "--skip-bad-lines", "--out", str(out)]) == 0
    assert f"{data}: 1200 records, 1 bad lines skipped (first: line 601: field \"text\" is empty)" \
        in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in rows)


def test_a_missing_optional_library_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    path = write(tmp_path / "d.jsonl.zst", [{"text": "x"}])
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if the data extra were not installed
    with pytest.raises(UserError, match=r"d.jsonl.zst: reading .zst files needs the zstandard package \(the data "
                                        r"extra\): pip install 'minimind-llm\[data\]'"):
        list(read_records(path, "pretrain"))


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_the_record(tmp_path, tokenizer_dir):
    path = tmp_path / "bom.jsonl"  # as Windows editors save UTF-8
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes([{"text": t} for t in TEXTS[:3]]))
    assert list(read_records(path, "pretrain")) == TEXTS[:3]
    out = tmp_path / "prepared"  # the block reader of `prepare` too
    assert main(["prepare", "--data", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 0
    assert Shard(out).meta["n_samples"] == 3
