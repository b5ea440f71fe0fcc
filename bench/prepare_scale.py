"""`minimind prepare` on a generated JSONL of --size-mb against the `tokenizers` library's own batch encoding.

    python bench/prepare_scale.py                    # 512 MB, every core, one repetition of each
    python bench/prepare_scale.py --size-mb 64 --repeats 3
    python bench/prepare_scale.py --quick            # 2 MB

The file is generated in a scratch directory (removed at exit) from the bundled demo pretraining text: each
document joins 3-12 sentences drawn at random (seed 0) from its distinct sentences, written as {"text": ...}
lines, so the text varies as real text does (English, Chinese, numbers) and generating it takes seconds.

Ours is exactly what `minimind prepare --workers N` runs (`minimind.data.prepare.prepare`: read, parse and
validate every line, tokenize, write the memory-mapped shard), timed end to end with the pool's start. The peer
is the ceiling of tokenising this file here: a `tokenizers.Tokenizer` of the same tokenizer.json reads the file in
blocks of lines, `json.loads` each, and encodes each block with `encode_batch_fast` (its fastest batch call, no
offsets) on all cores (its Rayon threads), taking the ids out; it writes nothing. Both count the same text tokens
(ours also writes a bos and an eos around each document, not counted). They alternate; the best of each counts.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from minimind.data.prepare import prepare  # noqa: E402
from minimind.demo_data import demo_file  # noqa: E402

SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*")


def demo_sentences() -> list[str]:
    """The distinct sentences of the bundled demo pretraining text, sorted (a fixed pool for any seed)."""
    pool: set[str] = set()
    with open(demo_file("pretrain.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            pool.update(s.strip() for s in SENTENCE_END.split(json.loads(line)["text"]) if s.strip())
    return sorted(pool)


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write {"text": ...} lines of 3-12 random demo sentences until `size_bytes` -> (bytes, documents)."""
    # Each sentence JSON-escaped once; a line is then a join of bytes, so generation runs at disk speed.
    pieces = [json.dumps(s, ensure_ascii=False)[1:-1].encode() for s in demo_sentences()]
    rng = random.Random(seed)
    written = documents = 0
    with open(path, "wb") as handle:
        while written < size_bytes:
            lines = [b'{"text": "' + b" ".join(rng.choices(pieces, k=rng.randint(3, 12))) + b'"}\n'
                     for _ in range(1000)]
            block = b"".join(lines)
            handle.write(block)
            written += len(block)
            documents += len(lines)
    return written, documents


def encode_file(tokenizer, path: Path, block_bytes: int) -> int:
    """The peer: read `path` in blocks of lines, decode each line's text, encode each block on every core ->
    the number of text tokens."""
    tokens = 0
    with open(path, "rb") as handle:
        while lines := handle.readlines(block_bytes):
            texts = [json.loads(line)["text"] for line in lines]
            tokens += sum(len(encoding.ids) for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    return tokens


def main(argv: list[str] | None = None) -> int:
    # Imported here, not above: prepare's worker processes are spawned, so each imports this file again, and
    # `common` imports torch (seconds of start-up per worker that `minimind prepare` itself never pays).
    import common

    parser = common.bench_parser(__doc__)
    parser.add_argument("--size-mb", type=float, default=512, help="size of the generated JSONL in MB (10^6 bytes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="prepare's worker processes (default: one per core)")
    parser.add_argument("--peer-block-mb", type=float, default=1.0,
                        help="bytes of lines the peer encodes per encode_batch_fast call, in MB")
    common.add_bench_arguments(parser, repeats=(1, "repetitions of each (best counts)"), quick="a 2 MB file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeats = 2, 1
    os.environ.pop("TOKENIZERS_PARALLELISM", None)  # the peer's threads on (the CLI's workers turn theirs off)
    from tokenizers import Tokenizer

    _, tokenizer_dir = common.demo_tokenizer()
    work = Path(common.scratch_dir("bench-prepare-scale-"))
    corpus = work / "corpus.jsonl"
    started = time.perf_counter()
    size, documents = write_corpus(corpus, int(args.size_mb * 1e6))
    print(common.machine_line())
    print(f"corpus: {size / 1e6:.1f} MB, {documents:,} documents, generated in {time.perf_counter() - started:.1f}s; "
          f"prepare: {args.workers} workers; peer: tokenizers encode_batch_fast, {args.peer_block_mb:g} MB blocks")
    peer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    counts: dict[str, int] = {}

    def run_prepare() -> None:
        out = work / "shard"
        shutil.rmtree(out, ignore_errors=True)
        meta = prepare(corpus, tokenizer_dir, "pretrain", out, workers=args.workers, progress=False)
        counts["ours"] = meta["n_tokens"] - 2 * meta["n_samples"]  # without the bos/eos pair around each document
        shutil.rmtree(out, ignore_errors=True)  # disk stays bounded by one shard

    def run_peer() -> None:
        counts["peer"] = encode_file(peer, corpus, int(args.peer_block_mb * 1e6))

    times = common.interleaved({"prepare": run_prepare, "peer": run_peer}, args.repeats, warmup=0)
    if counts["ours"] != counts["peer"]:
        raise SystemExit(f"token counts differ: prepare {counts['ours']:,}, peer {counts['peer']:,}")
    rates = {name: counts["peer"] / min(seconds) for name, seconds in times.items()}
    for name, seconds in times.items():
        print(f"{name:>7}: {counts['peer']:,} tokens in {min(seconds):.1f}s best of {len(seconds)} -> "
              f"{rates[name]:,.0f} tokens/s, {size / 1e6 / min(seconds):.2f} MB/s")
    print(f"bench took {time.perf_counter() - started:.0f}s; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(common.ratio_line("prepare_scale", rates["prepare"], rates["peer"], "tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
