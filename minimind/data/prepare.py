"""`minimind prepare`: tokenize a JSONL dataset once into memory-mapped shards that training streams from.

    minimind prepare --data pretrain.jsonl --tokenizer runs/tokenizer --kind pretrain --out data/pretrain

The file is read in chunks of lines and tokenized by worker processes (order preserved), and written as it
goes, so neither the JSONL nor the tokens need to fit in memory. Training verbs given a JSONL file run the
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
from pathlib import Path

from tqdm import tqdm

from minimind.data.chat import ChatAugment, encode_conversation, encode_prompt
from minimind.data.shards import SHARD_FILES, Shard, ShardWriter
from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.outputs import WriteFailed, refuse_or_clear, remove_products, writing, writing_product
from minimind.records import BadRecord, ReadStats, parse_record

KINDS = ("pretrain", "sft", "dpo", "rlaif")
CHUNK_LINES = 256

_worker_tokenizer = None  # set once per worker process by _init_worker


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from minimind.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_dir)


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


def _process_chunk(args: tuple[str, int, list[bytes], ChatAugment | None]) -> tuple[int, list]:
    """Worker: parse, validate and tokenize a chunk of lines -> (bytes read, results); a bad line comes back
    as ("bad", (lineno, reason)) so the main process reports or counts it in file order."""
    kind, first_line, lines, augment = args
    out = []
    for lineno, raw in enumerate(lines, start=first_line):
        try:
            record = parse_record(raw, kind)
            if record is not None:
                out.append(("ok", tokenize_record(_worker_tokenizer, kind, record, augment, lineno)))
        except BadRecord as err:
            out.append(("bad", (lineno, str(err))))
    return sum(len(line) for line in lines), out


def _chunks(path: Path, kind: str,
            augment: ChatAugment | None) -> Iterator[tuple[str, int, list[bytes], ChatAugment | None]]:
    with open(path, "rb") as handle:
        lineno = 1
        while lines := list(itertools.islice(handle, CHUNK_LINES)):
            yield kind, lineno, lines, augment
            lineno += len(lines)


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
    data, out_dir = Path(data), Path(out_dir)
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not data.is_file():
        raise UserError(f"{data}: no such file")
    try:
        with writing(out_dir):
            return _write_shards(data, str(tokenizer_dir), kind, out_dir, workers, skip_bad_lines, progress,
                                 augment)
    except WriteFailed:
        remove_products(out_dir, SHARD_FILES)
        raise


def _write_shards(data: Path, tokenizer_dir: str, kind: str, out_dir: Path, workers: int, skip_bad_lines: bool,
                  progress: bool, augment: ChatAugment | None = None) -> dict:
    _init_worker(tokenizer_dir)
    writer = ShardWriter(out_dir, kind, vocab_size=len(_worker_tokenizer), with_mask=kind in ("sft", "dpo"),
                         with_extra=kind == "rlaif")
    stats = ReadStats()
    start = time.time()
    bar = tqdm(total=data.stat().st_size, unit="B", unit_scale=True, desc=f"prepare {data.name}",
               disable=not progress)
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,)) if workers > 0 else None
    try:
        chunks = _chunks(data, kind, augment)
        for n_bytes, chunk in pool.imap(_process_chunk, chunks) if pool else map(_process_chunk, chunks):
            bar.update(n_bytes)
            for status, payload in chunk:
                if status == "bad":
                    stats.reject(data, *payload, skip_bad_lines)
                    continue
                stats.good += 1
                for ids, mask, extra in payload:
                    writer.add(ids, mask, extra)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    stats.check_any(data, kind)
    seconds = time.time() - start
    return writer.close(
        source=str(data.resolve()), tokenizer=tokenizer_dir, records=stats.good, skipped_lines=stats.skipped,
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
    """A prepared directory as is, or a JSONL file prepared into `cache_root` once (reused on resume).

    Under torchrun only the main process prepares; `barrier()` (if given) holds the others until it is done.
    `augment` (sft): the loader's augmentations; their settings are part of the cache key.
    """
    data = Path(data)
    augment = augment if augment is not None and augment.active else None
    if data.is_dir():
        if augment is not None:
            raise UserError(f"{data}: --add-system-ratio / --empty-think-ratio apply while a JSONL file is prepared; "
                            "this directory is already prepared")
        shard = Shard(data)
        if shard.kind != kind:
            raise UserError(f"{data}: prepared as {shard.kind!r} data, but this stage needs {kind!r}")
        return shard
    if not data.is_file():
        raise UserError(f"{data}: no such file or prepared directory")
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    key = file_fingerprint(data, tok_file) if tok_file.is_file() else file_fingerprint(data)
    if augment is not None:
        key += f"-{augment.key()}"
    target = Path(cache_root) / f"{kind}-{data.stem}-{key}"
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
    parser.add_argument("--data", required=True, help="input JSONL file")
    parser.add_argument("--tokenizer", required=True, type=model_dir, help="tokenizer (or model) directory")
    parser.add_argument("--kind", choices=KINDS, default="pretrain",
                        help="dataset shape (README, Data formats): pretrain {'text'}, sft {'conversations'}, "
                             "dpo {'chosen','rejected'}, rlaif (conversations whose last turn is the answer)")
    parser.add_argument("--out", required=True, help="output directory for the prepared shards")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokenizer worker processes (0 = tokenize in this process)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed lines")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared dataset already in --out (without it such an --out is refused)")


def run(args: argparse.Namespace) -> int:
    refuse_or_clear(args.out, SHARD_FILES, "a prepared dataset", args.overwrite)
    with writing_product(args.out, SHARD_FILES):
        meta = prepare(args.data, args.tokenizer, args.kind, args.out, args.workers, args.skip_bad_lines)
    print(f"prepared {meta['n_samples']} samples, {meta['n_tokens']:,} tokens in {meta['seconds']:.1f}s "
          f"({meta['tokens_per_second']:,} tokens/s) -> {args.out}")
    if meta["skipped_lines"]:
        print(f"skipped {meta['skipped_lines']} bad lines (first: {'; '.join(meta['skipped_examples'])})")
    return 0
