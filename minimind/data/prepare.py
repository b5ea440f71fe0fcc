"""`minimind prepare`: tokenize a JSONL dataset once into memory-mapped shards that training streams from.

    minimind prepare --data pretrain.jsonl --tokenizer runs/tokenizer --kind pretrain --out data/pretrain

The data (any source README "Data formats" lists: JSONL, .jsonl.gz, .jsonl.zst, Parquet, a directory or glob of
them, hf:org/name) is read in chunks (blocks of whole JSON lines, or batches of rows) that worker processes parse,
validate and tokenize (pretraining text in one batched call of the `tokenizers` backend per chunk) and send back as
arrays, written in file order as they come, so neither the JSONL nor the tokens need to fit in memory. Training verbs given a JSONL file run the
same code into `<out>/prepared/` and reuse it on resume.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimind.data.chat import ChatAugment, encode_conversation, encode_prompt
from minimind.data.shards import SHARD_FILES, Shard, ShardWriter, token_dtype
from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.outputs import WriteFailed, remove_products, replacing_product, writing
from minimind.records import BadRecord, ReadStats, parse_item
from minimind.sources import (
    Item,
    check_source,
    is_hf,
    is_line,
    is_line_file,
    iter_items,
    line_blocks,
    split_lines,
)
from minimind.sources import expand as expand_source
from minimind.sources import fingerprint as source_fingerprint
from minimind.sources import stem as source_stem
from minimind.tokenizer import TextEncoder, encode_texts

KINDS = ("pretrain", "sft", "dpo", "rlaif")
CHUNK_ROWS = 256  # Parquet / hf: rows per worker task
CHUNK_BYTES = 1 << 20  # JSON-lines bytes per worker task: thousands of documents for one batched encode

@dataclass(frozen=True)
class PlainText:
    """How pretraining text becomes a sample without transformers: the tokenizer's `TextEncoder`, the ids put
    around each document, and the vocabulary size (the shard's dtype)."""

    encoder: TextEncoder
    bos_id: int
    eos_id: int
    vocab_size: int

    @classmethod
    def of(cls, tokenizer) -> PlainText | None:
        """For a fast tokenizer with bos and eos; None where text goes through `tokenize_record`."""
        encoder = TextEncoder.of(tokenizer)
        if encoder is None or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            return None
        return cls(encoder, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer))


# Set once per worker process by _init_worker: the HF tokenizer (chats, and text without a PlainText), or for
# pretraining text (PlainText, its loaded backend). A worker that only encodes text never imports transformers.
_worker_tokenizer = None
_worker_text: tuple[PlainText, object] | None = None


def _init_worker(tokenizer_dir: str, plain: PlainText | None = None, tokenizer=None) -> None:
    global _worker_tokenizer, _worker_text
    _worker_text = (plain, plain.encoder.load()) if plain is not None else None
    if tokenizer is None and plain is None:
        from minimind.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    _worker_tokenizer = tokenizer


def _init_pool_worker(tokenizer_dir: str, plain: PlainText | None) -> None:
    # The pool's processes already fill the cores; the backend's own threads in each would only contend.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _init_worker(tokenizer_dir, plain)


Chunk = list[Item] | tuple[str, int, bytes]  # decoded rows, or (file, number of its first line, whole lines)


@dataclass
class Samples:
    """A chunk's samples back to back as the shard files hold them: a few arrays, cheap to send between
    processes. `tokens` (n_tokens,), `lengths` (n_samples,), `mask` (n_tokens,) uint8 for sft/dpo, `extras` one
    per sample for rlaif; `records` counts the good records they came from (a dpo pair gives two samples)."""

    records: int
    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None = None
    extras: list | None = None


def tokenize_record(tokenizer, kind: str, record, augment: ChatAugment | None = None,
                    line: int = 0) -> list[tuple[list[int], list[int] | None, object]]:
    """One validated record -> the (ids, mask, extra) samples it becomes (two for a dpo pair). `augment` (sft):
    the loader's augmentations, drawn for file line `line`."""
    if kind == "pretrain":
        ids = tokenizer(record, add_special_tokens=False)["input_ids"]
        return [([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id], None, None)]
    if kind == "sft":
        no_empty_think = False
        if augment is not None and augment.active:
            record, no_empty_think = augment.apply(record, line)
        ids, mask = encode_conversation(tokenizer, record, no_empty_think=no_empty_think)
        return [(ids, mask, None)]
    if kind == "dpo":
        chosen, rejected = record
        return [(*encode_conversation(tokenizer, chosen), None), (*encode_conversation(tokenizer, rejected), None)]
    prompt, answer = record  # rlaif
    return [(encode_prompt(tokenizer, prompt), None, {"answer": answer, "prompt": prompt})]


def pretrain_samples(ids: list[list[int]], bos_id: int, eos_id: int, dtype) -> Samples:
    """Each document's text ids -> [bos, *ids, eos] each, back to back (what `tokenize_record` gives one by one)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 2
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    body = np.ones(len(tokens), dtype=bool)  # (n_tokens,): False at each sample's bos and eos
    body[ends - lengths] = body[ends - 1] = False
    tokens[ends - lengths] = bos_id
    tokens[ends - 1] = eos_id
    tokens[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=len(tokens) - 2 * len(ids))
    return Samples(len(ids), tokens, lengths)


def _samples(kind: str, results: list[list[tuple[list[int], list[int] | None, object]]], dtype) -> Samples:
    """`tokenize_record` results of a chunk -> its Samples."""
    flat = [sample for result in results for sample in result]
    lengths = np.fromiter((len(ids) for ids, _, _ in flat), dtype=np.int64, count=len(flat))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(ids for ids, _, _ in flat), dtype=dtype, count=total)
    mask = np.fromiter(itertools.chain.from_iterable(m for _, m, _ in flat), dtype=np.uint8, count=total) \
        if kind in ("sft", "dpo") else None
    extras = [extra for _, _, extra in flat] if kind == "rlaif" else None
    return Samples(len(results), tokens, lengths, mask, extras)


def _chunk_items(chunk: Chunk) -> list[Item]:
    if isinstance(chunk, list):
        return chunk
    name, first, block = chunk
    return [(name, first + i, raw) for i, raw in enumerate(split_lines(block))]


def _process_chunk(args: tuple[str, Chunk, ChatAugment | None]) -> tuple[int, list, Samples]:
    """Worker: parse, validate and tokenize a chunk -> (items read, bad ones as (where, number, reason, unit) for
    the main process to report or count in file order, the good ones' Samples)."""
    kind, chunk, augment = args
    items = _chunk_items(chunk)
    bad, texts, results = [], [], []
    for where, number, payload in items:
        try:
            record = parse_item(payload, kind)
            if record is None:
                continue
            if _worker_text is not None:
                texts.append(record)  # encoded together below
            else:
                results.append(tokenize_record(_worker_tokenizer, kind, record, augment, number))
        except BadRecord as err:
            bad.append((where, number, str(err), "line" if is_line(payload) else "row"))
    if _worker_text is not None:
        plain, backend = _worker_text
        samples = pretrain_samples(encode_texts(backend, texts), plain.bos_id, plain.eos_id,
                                   token_dtype(plain.vocab_size))
        return len(items), bad, samples
    return len(items), bad, _samples(kind, results, token_dtype(len(_worker_tokenizer)))


def _chunks(data: str, kind: str, augment: ChatAugment | None) -> Iterator[tuple[str, Chunk, ChatAugment | None]]:
    for name in expand_source(data):
        if is_line_file(name):  # whole-line blocks: the workers split them, so this process stays light
            for first, block in line_blocks(name, CHUNK_BYTES):
                yield kind, (name, first, block), augment
            continue
        items = iter_items(name)
        while chunk := list(itertools.islice(items, CHUNK_ROWS)):
            yield kind, chunk, augment


def prepare(
    data: str | Path,
    tokenizer_dir: str | Path,
    kind: str,
    out_dir: str | Path,
    workers: int = 0,
    skip_bad_lines: bool = False,
    progress: bool = True,
    augment: ChatAugment | None = None,
) -> dict:
    """Tokenize `data` into a prepared directory; returns its meta (counts, timing). `augment`: the SFT
    loader's augmentations (sft data only).

    A write that fails (full disk) removes the partial shard files and raises WriteFailed.
    """
    data, out_dir = str(data), Path(out_dir)
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    expand_source(data)  # a missing file, empty directory or bad hf: name: one line before anything is written
    try:
        with writing(out_dir):
            return _write_shards(data, str(tokenizer_dir), kind, out_dir, workers, skip_bad_lines, progress,
                                 augment)
    except WriteFailed:
        remove_products(out_dir, SHARD_FILES)
        raise


def _write_shards(data: str, tokenizer_dir: str, kind: str, out_dir: Path, workers: int, skip_bad_lines: bool,
                  progress: bool, augment: ChatAugment | None = None) -> dict:
    from minimind.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    plain = PlainText.of(tokenizer) if kind == "pretrain" else None
    _init_worker(tokenizer_dir, plain, tokenizer)
    writer = ShardWriter(out_dir, kind, vocab_size=len(tokenizer), with_mask=kind in ("sft", "dpo"),
                         with_extra=kind == "rlaif")
    stats = ReadStats()
    start = time.time()
    bar = tqdm(unit=" records", unit_scale=True, desc=f"prepare {source_stem(data)}", disable=not progress)
    pool = mp.get_context("spawn").Pool(workers, _init_pool_worker, (tokenizer_dir, plain)) if workers > 0 else None
    try:
        chunks = _chunks(data, kind, augment)
        for n_items, bad, samples in pool.imap(_process_chunk, chunks) if pool else map(_process_chunk, chunks):
            bar.update(n_items)
            for where, number, reason, unit in bad:
                stats.reject(where, number, reason, skip_bad_lines, unit)
            stats.good += samples.records
            writer.add_many(samples.tokens, samples.lengths, samples.mask, samples.extras)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    stats.check_any(data, kind)
    seconds = time.time() - start
    return writer.close(
        source=data if is_hf(data) else str(Path(data).resolve()), tokenizer=tokenizer_dir, records=stats.good, skipped_lines=stats.skipped,
        skipped_examples=stats.examples, seconds=round(seconds, 3),
        tokens_per_second=round(writer.n_tokens / max(seconds, 1e-9)),
    )


def file_fingerprint(*paths: str | Path) -> str:
    """A cache key that changes when any file's path, size or modification time changes."""
    digest = hashlib.sha1()
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def open_dataset(
    data: str | Path, tokenizer_dir: str | Path, kind: str, cache_root: str | Path,
    skip_bad_lines: bool = False, workers: int = 0, is_main: bool = True, barrier=None,
    augment: ChatAugment | None = None,
) -> Shard:
    """A prepared directory as is, or a data source (JSONL, .gz, .zst, Parquet, a directory or glob of them,
    hf:org/name) prepared into `cache_root` once (reused on resume).

    Under torchrun only the main process prepares; `barrier()` (if given) holds the others until it is done.
    `augment` (sft): the loader's augmentations; their settings are part of the cache key.
    """
    augment = augment if augment is not None and augment.active else None
    if Path(data).is_dir() and (Path(data) / "meta.json").is_file():
        data = Path(data)
        if augment is not None:
            raise UserError(f"{data}: --add-system-ratio / --empty-think-ratio apply while a JSONL file is prepared; "
                            "this directory is already prepared")
        shard = Shard(data)
        if shard.kind != kind:
            raise UserError(f"{data}: prepared as {shard.kind!r} data, but this stage needs {kind!r}")
        return shard
    check_source(data)
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    tok_files = [tok_file] if tok_file.is_file() else []
    if Path(data).is_file():
        key = file_fingerprint(data, *tok_files)  # one file: the key runs before other sources had, so resumes reuse it
    else:
        key = hashlib.sha1(f"{source_fingerprint(data)}:{file_fingerprint(*tok_files)}".encode()).hexdigest()[:16]
    if augment is not None:
        key += f"-{augment.key()}"
    target = Path(cache_root) / f"{kind}-{source_stem(data)}-{key}"
    if is_main and not (target / "meta.json").is_file():
        meta = prepare(data, tokenizer_dir, kind, target, workers=workers, skip_bad_lines=skip_bad_lines,
                       augment=augment)
        if meta["skipped_lines"]:
            print(f"{data}: {meta['records']} records, {meta['skipped_lines']} bad lines skipped "
                  f"(first: {'; '.join(meta['skipped_examples'])})")
    if barrier is not None:
        barrier()
    return Shard(target)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="input data: JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, a directory or glob of "
                             "them, or hf:ORG/NAME[:CONFIG][:SPLIT]")
    parser.add_argument("--tokenizer", required=True, type=model_dir, help="tokenizer (or model) directory")
    parser.add_argument("--kind", choices=KINDS, default="pretrain",
                        help="dataset shape (README, Data formats): pretrain {'text'}, sft {'conversations'}, "
                             "dpo {'chosen','rejected'}, rlaif (conversations whose last turn is the answer)")
    parser.add_argument("--out", required=True, help="output directory for the prepared shards")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes that parse and tokenize (default: one per core; 0 = all in this "
                             "process); this one only reads blocks of the file and writes the shard")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed lines")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared dataset already in --out (without it such an --out is refused)")


def run(args: argparse.Namespace) -> int:
    with replacing_product(args.out, SHARD_FILES, "a prepared dataset", args.overwrite) as staging:
        meta = prepare(args.data, args.tokenizer, args.kind, staging, args.workers, args.skip_bad_lines)
    print(f"prepared {meta['n_samples']} samples, {meta['n_tokens']:,} tokens in {meta['seconds']:.1f}s "
          f"({meta['tokens_per_second']:,} tokens/s) -> {args.out}")
    if meta["skipped_lines"]:
        print(f"skipped {meta['skipped_lines']} bad lines (first: {'; '.join(meta['skipped_examples'])})")
    return 0
