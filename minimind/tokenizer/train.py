"""Train a byte-level BPE tokenizer (HF `tokenizers`) and save a directory `AutoTokenizer` loads.

    minimind tokenizer --data minimind/demo_data/pretrain.jsonl --vocab-size 6400 --out runs/tokenizer
    minimind tokenizer --data pretrain_t2t.jsonl --template minimind3 --out runs/tokenizer3
    minimind tokenizer --data big.jsonl --sample-bytes 200M --max-texts 500000 --seed 0 --out runs/tokenizer

`--template` picks the chat format: `minimind2` (the default: <unk>/<s>/</s> and our template) or `minimind3`
(today's MiniMind: its 36 added tokens at the same ids, <|im_start|>/<|im_end|>, and a template that renders what
minimind-3's renders, thinking switch included).

With `--max-texts` / `--sample-bytes` the trainer sees a uniform random sample of the records (seeded, so the
same seed gives the same tokenizer) drawn in one streaming pass: memory holds the sample, never the file, and the
command prints its peak memory.

Byte-level means every UTF-8 string (Chinese, emoji, anything) round-trips losslessly: the base alphabet
is the 256 bytes, so no input is ever <unk>.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from minimind.errors import UserError
from minimind.outputs import refuse_products, replacing_product
from minimind.records import ReadStats, read_records
from minimind.sources import is_line, iter_items
from minimind.tokenizer.template import FORMATS, TokenizerFormat


def texts_from_jsonl(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None) -> Iterator[str]:
    """The training text of a data source (JSONL, .gz, .zst, Parquet, a directory or glob, hf:): `text` records,
    or every message of `conversations` records."""
    kind = _sniff_kind(path)
    for record in read_records(path, kind, skip_bad_lines=skip_bad_lines, stats=stats):
        if kind == "pretrain":
            yield record
        else:
            yield "\n".join(m["content"] for m in record)


def sample_texts(texts: Iterable[str], max_texts: int | None = None, max_bytes: int | None = None,
                 seed: int = 0) -> list[str]:
    """A uniform random sample of `texts` within both caps (a count, and UTF-8 bytes in all), in their original
    order, from one streaming pass whose memory is the sample itself.

    Every text draws a seeded random key and the ones with the smallest keys are kept (bottom-k sampling): a
    text is dropped once keeping it would break a cap and no kept text has a larger key, so which texts are
    kept depends only on the seed and the input."""
    rng = random.Random(seed)
    kept: list[tuple[float, int, str, int]] = []  # a max-heap by key: (-key, position, text, bytes)
    total = 0
    for position, text in enumerate(texts):
        key = rng.random()
        size = len(text.encode("utf-8")) if max_bytes is not None else 0
        if kept and key > -kept[0][0] and ((max_texts is not None and len(kept) >= max_texts)
                                           or (max_bytes is not None and total + size > max_bytes)):
            continue  # it would be the first one evicted
        heapq.heappush(kept, (-key, position, text, size))
        total += size
        while kept and ((max_texts is not None and len(kept) > max_texts)
                        or (max_bytes is not None and total > max_bytes)):
            total -= heapq.heappop(kept)[3]
    return [text for _, _, text, _ in sorted(kept, key=lambda entry: entry[1])]


def byte_count(value: str) -> int:
    """`--sample-bytes` as given: a number of bytes, with an optional K, M or G (10^3, 10^6, 10^9)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", value, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 500000, 200M or 1.5G, got {value!r}")
    return int(float(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2).upper()])


def peak_memory_mb() -> float:
    """This process's peak resident memory so far, in MB (10^6 bytes); 0 where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss counts bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 1e6


def _sniff_kind(path: str | Path) -> str:
    """Pick the reader from the first non-blank record, so one verb takes pretrain or chat data."""
    for _, _, payload in iter_items(path):
        if is_line(payload):
            if not payload.strip():
                continue
            try:
                payload = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "pretrain"  # let the reader report the error with its line number
        return "sft" if isinstance(payload, dict) and "conversations" in payload else "pretrain"
    raise UserError(f"{path}: the file is empty")


def _format(template: str) -> TokenizerFormat:
    if template not in FORMATS:
        raise UserError(f"--template must be one of {', '.join(FORMATS)}, got {template!r}")
    return FORMATS[template]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, show_progress: bool = True,
                    template: str = "minimind2"):
    """Learn byte-level BPE merges; returns a `tokenizers.Tokenizer` whose ids 0..n-1 are the format's added
    tokens (<unk>=0, <s>=1, </s>=2 for minimind2; <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 … for minimind3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    fmt = _format(template)
    specials = list(fmt.added_tokens)
    n_base = 256 + len(specials)
    if vocab_size <= n_base:
        raise UserError(f"--vocab-size must be greater than {n_base} (256 bytes + {len(specials)} specials)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    got = tokenizer.get_vocab_size()
    if got != vocab_size:
        raise UserError(
            f"the training text only supports {got} tokens, fewer than --vocab-size {vocab_size}; "
            "use more text or a smaller vocabulary"
        )
    if fmt.n_special < len(specials):
        tokenizer = _unmark_special(tokenizer, fmt.n_special)
    return tokenizer


def _unmark_special(tokenizer, n_special: int):
    """The trainer makes every added token special; past the first `n_special` they become plain added tokens
    (minimind-3's <tool_call>, <think>, <|bufferN|>: kept when decoding with skip_special_tokens)."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    for token in state["added_tokens"]:
        if token["id"] >= n_special:
            token["special"] = False
    return Tokenizer.from_str(json.dumps(state, ensure_ascii=False))


def save_tokenizer(tokenizer, out_dir: str | Path, model_max_length: int = 32768, template: str = "minimind2") -> Path:
    """Write tokenizer.json + tokenizer_config.json (with the chat template of format `template` inside)."""
    fmt = _format(template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # Written by hand rather than by `save_pretrained` so the template sits in tokenizer_config.json and the
    # class name is one every transformers version knows.
    added = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": i < fmt.n_special}
        for i, tok in enumerate(fmt.added_tokens)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": fmt.bos,
        "eos_token": fmt.eos,
        "unk_token": fmt.unk,
        "pad_token": fmt.pad,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": fmt.chat_template,
    }
    if fmt.additional_special_tokens:
        config["additional_special_tokens"] = list(fmt.additional_special_tokens)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="{'text'} or {'conversations'} records: JSONL (.gz, .zst), "
                        "Parquet, a directory or glob of them, or hf:ORG/NAME[:CONFIG][:SPLIT]")
    parser.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size, special tokens included")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed lines")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the tokenizer already in --out (without it such an --out is refused)")
    parser.add_argument("--max-texts", type=int, default=None,
                        help="train on a random sample of at most this many records (default: all of them)")
    parser.add_argument("--sample-bytes", type=byte_count, default=None,
                        help="train on a random sample of at most this much text in all, e.g. 200M or 1G "
                             "(UTF-8 bytes; default: all of it); the sample is what memory holds")
    parser.add_argument("--seed", type=int, default=0,
                        help="which random sample --max-texts / --sample-bytes draw (the same seed, the same tokenizer)")
    parser.add_argument("--template", choices=list(FORMATS), default="minimind2",
                        help="chat format: minimind2 (<unk>/<s>/</s> and our template) or minimind3 (today's "
                             "MiniMind: its 36 added tokens at the same ids and its ChatML template with <think>)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--max-texts", args.max_texts), ("--sample-bytes", args.sample_bytes)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    _sniff_kind(args.data)  # a missing or empty --data is reported before anything about --out
    refuse_products(args.out, TOKENIZER_FILES, "a tokenizer", args.overwrite)  # before the training, not after
    started = time.perf_counter()
    stats = ReadStats()
    texts: Iterable[str] = texts_from_jsonl(args.data, args.skip_bad_lines, stats)
    sampled = ""
    if args.max_texts is not None or args.sample_bytes is not None:
        texts = sample_texts(texts, args.max_texts, args.sample_bytes, args.seed)
        size = sum(len(text.encode("utf-8")) for text in texts)
        sampled = f" (a sample of {len(texts)}, {size / 1e6:.1f} MB, seed {args.seed})"
    tokenizer = train_tokenizer(texts, args.vocab_size, template=args.template)
    with replacing_product(args.out, TOKENIZER_FILES, "a tokenizer", args.overwrite) as staging:
        save_tokenizer(tokenizer, staging, template=args.template)
    if stats.skipped:
        print(stats.summary(args.data))
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens from {stats.good} records{sampled} -> {args.out}")
    print(f"took {time.perf_counter() - started:.1f}s, peak memory {peak_memory_mb():,.0f} MB")
    return 0
