"""Where dataset records come from (README, "Data formats"): one reader that every consumer of records uses.

A data source is one of
  FILE.jsonl / FILE.json   JSON lines (any other suffix is read as JSON lines too)
  FILE.jsonl.gz            gzip-compressed JSON lines
  FILE.jsonl.zst           zstandard-compressed JSON lines (needs `zstandard`: the `data` extra)
  FILE.parquet             Parquet, streamed one batch of a row group at a time (needs `pyarrow`: the `data` extra)
  DIR                      every such file in DIR and below, in sorted order
  GLOB                     every such file matching a pattern with * ? or [...] (quote it in the shell)
  hf:ORG/NAME[:CONFIG][:SPLIT]   a Hugging Face dataset, streamed (needs `datasets`: the `data` extra); CONFIG
                           may also be a data file of the repository (a name ending in .jsonl, .parquet, ...),
                           SPLIT defaults to train
An item is (where, number, payload): a JSON line's raw bytes numbered by line (of the decompressed stream), or an
already-decoded row object numbered by row (from 1). Errors read `file:line: ...` or `file:row N: ...`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind.errors import UserError, install_hint

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
HF_PREFIX = "hf:"
PARQUET_BATCH_ROWS = 1024
EXTRA_HINT = install_hint("data")

Item = tuple[str, int, Any]  # (file or hf: source, line or row number, raw line bytes or a decoded row)


def is_line(payload: Any) -> bool:
    """Whether an item's payload is a raw JSON line (numbered by line) rather than a decoded row."""
    return isinstance(payload, bytes)


def location(where: str, number: int, payload: Any) -> str:
    """`file:line` for a JSON line, `file:row N` for a Parquet or dataset row."""
    return f"{where}:{number}" if is_line(payload) else f"{where}:row {number}"


@dataclass(frozen=True)
class HFSource:
    """`hf:org/name[:config][:split]` parsed."""

    name: str
    config: str | None = None
    data_files: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, source: str) -> HFSource:
        """The parts of an `hf:` source; a middle part that names a file becomes `data_files`."""
        parts = source[len(HF_PREFIX):].split(":")
        if not parts[0] or parts[0].count("/") != 1 or len(parts) > 3 or not all(parts):
            raise UserError(f"{source}: expected hf:ORG/NAME[:CONFIG][:SPLIT]")
        config = parts[1] if len(parts) > 1 else None
        split = parts[2] if len(parts) > 2 else "train"
        if config is not None and config.endswith(DATA_SUFFIXES + (".csv", ".txt")):
            return cls(parts[0], data_files=config, split=split)
        return cls(parts[0], config=config, split=split)


def check_source(source: str | Path) -> None:
    """Raise UserError unless `source` can name data: an existing file or directory, a glob, or hf:org/name."""
    if not is_hf(source) and not Path(source).exists() and not glob.has_magic(str(source)):
        raise UserError(f"{source}: no such file or prepared directory")


def is_hf(source: str | Path) -> bool:
    """Whether `source` names a Hugging Face dataset rather than local files."""
    return str(source).startswith(HF_PREFIX)


def expand(source: str | Path) -> list[str]:
    """The files (or the one hf: source) that `source` stands for, in reading order; one-line error if none."""
    text = str(source)
    if is_hf(text):
        HFSource.parse(text)
        return [text]
    path = Path(text)
    if path.is_file():
        return [text]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
        if not files:
            raise UserError(f"{path}: a directory with no data files (expected {', '.join(DATA_SUFFIXES)})")
        return files
    if glob.has_magic(text):
        files = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{text}: no file matches this pattern")
        return files
    raise UserError(f"{path}: no such file")


def exists(source: str | Path) -> bool:
    """Whether `source` names readable data (without reading it): a file, data directory, matching glob or hf:."""
    try:
        expand(source)
    except UserError:
        return False
    return True


def fingerprint(source: str | Path) -> str:
    """A cache key that changes when any file's path, size or modification time changes (hf: its name)."""
    digest = hashlib.sha1()
    for name in expand(source):
        if is_hf(name):
            digest.update(name.encode())
            continue
        stat = Path(name).stat()
        digest.update(f"{Path(name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def stem(source: str | Path) -> str:
    """A short file-name-safe name for `source` (its file name without data suffixes)."""
    name = str(source).rstrip("/").replace(HF_PREFIX, "hf-", 1)
    name = re.split(r"[/\\]", name)[-1] or "data"
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def iter_items(source: str | Path) -> Iterator[Item]:
    """Every item of every file of `source`, streaming (no file is loaded whole)."""
    for name in expand(source):
        if is_hf(name):
            yield from _hf_rows(name)
        elif name.endswith(PARQUET_SUFFIXES):
            yield from _parquet_rows(name)
        else:
            yield from _lines(name)


# The UTF-8 byte-order mark Windows editors put before a file's first line: not part of the first record.
BOM = b"\xef\xbb\xbf"


def _without_bom(lineno: int, data: bytes) -> bytes:
    """`data` (starting at line `lineno`) without the byte-order mark a file's first line may carry."""
    return data[len(BOM):] if lineno == 1 and data.startswith(BOM) else data


def _lines(name: str) -> Iterator[Item]:
    lineno = 0
    try:
        with _open_lines(name) as handle:
            for lineno, raw in enumerate(handle, start=1):
                yield name, lineno, _without_bom(lineno, raw)
    except Exception as err:
        _raise_damaged(name, lineno + 1, err)


def is_line_file(name: str) -> bool:
    """Whether one file of a source (an `expand` entry) is read as JSON lines (plain or compressed)."""
    return not is_hf(name) and not name.endswith(PARQUET_SUFFIXES)


def line_blocks(name: str, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """A JSON-lines file (plain, .gz or .zst) as (number of its first line, whole lines) blocks of about
    `block_bytes`, streaming: `split_lines` of each block gives exactly the lines `iter_items` yields, so a
    reader can hand blocks to worker processes instead of one object per line."""
    lineno, tail = 1, b""
    try:
        with _open_lines(name) as handle:
            while data := handle.read(block_bytes):
                data = tail + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading until it ends
                    tail = data
                    continue
                block, tail = data[:cut], data[cut:]
                yield lineno, _without_bom(lineno, block)
                lineno += block.count(b"\n")
    except Exception as err:
        _raise_damaged(name, lineno, err)
    if tail:
        yield lineno, _without_bom(lineno, tail)


def split_lines(block: bytes) -> list[bytes]:
    """A `line_blocks` block -> its lines, split on newlines only as a file is iterated (a `\\r` stays inside)."""
    lines = block.split(b"\n")
    if not lines[-1]:
        lines.pop()
    return lines


def _raise_damaged(name: str, lineno: int, err: Exception) -> None:
    """A read error of a (compressed) line file -> one line naming the file and line; anything else re-raised."""
    # zstandard.ZstdError has no importable base worth naming here
    if isinstance(err, (OSError, EOFError, zlib.error)) or type(err).__name__ == "ZstdError":
        raise UserError(f"{name}:{lineno}: the compressed stream is damaged ({err})") from None
    raise err


def _open_lines(name: str) -> io.BufferedIOBase:
    if name.endswith(".gz"):
        return gzip.open(name, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{name}: reading .zst files needs the zstandard package (the data extra): {EXTRA_HINT}") \
            from None
        handle = open(name, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(handle, closefd=True))
    return open(name, "rb")


def _parquet_rows(name: str) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{name}: reading Parquet files needs the pyarrow package (the data extra): {EXTRA_HINT}") \
            from None
    try:
        parquet = pq.ParquetFile(name)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError variants for a file that is not Parquet
        raise UserError(f"{name}: not a readable Parquet file ({err})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield name, row, record


def _hf_rows(name: str) -> Iterator[Item]:
    source = HFSource.parse(name)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name}: hf: datasets need the datasets package (the data extra): {EXTRA_HINT}") \
            from None
    try:
        dataset = datasets.load_dataset(source.name, source.config, data_files=source.data_files,
                                        split=source.split, streaming=True)
    except Exception as err:  # missing repo, config or split, no network: one line
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{name}: cannot open the dataset ({reason})") from None
    for row, record in enumerate(dataset, start=1):
        yield name, row, record
