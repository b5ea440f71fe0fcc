"""Pre-tokenized datasets on disk: token ids as a memory-mapped `uint16` array plus a sample index.

A prepared directory (written by `minimind prepare`, read by every training stage):
    meta.json    kind, sample and token counts, dtype, the source file and tokenizer it came from
    tokens.bin   all samples' token ids, back to back (uint16; uint32 for vocabularies over 65535)
    mask.bin     one uint8 per token: 1 where the token is a training target (sft, dpo); absent for pretrain
    index.bin    int64 offsets, n_samples + 1 of them: sample i is tokens[index[i]:index[i+1]]
    extra.jsonl  one JSON line per sample with non-token data (rlaif reference answers)
Nothing is loaded whole: the arrays are `np.memmap`s, so a dataset larger than RAM trains fine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from minimind.errors import UserError

FORMAT_VERSION = 1
SHARD_FILES = ("meta.json", "tokens.bin", "mask.bin", "index.bin", "extra.jsonl", "meta.json.tmp")


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The dtype of tokens.bin for a vocabulary: uint16 where every id fits, uint32 past 65536."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


class ShardWriter:
    """Append samples to a prepared directory; `close()` writes meta.json last (its presence = complete)."""

    def __init__(self, out_dir: str | Path, kind: str, vocab_size: int, with_mask: bool, with_extra: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").unlink(missing_ok=True)
        self.kind = kind
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.tokens = open(self.dir / "tokens.bin", "wb")
        self.mask = open(self.dir / "mask.bin", "wb") if with_mask else None
        self.extra = open(self.dir / "extra.jsonl", "w", encoding="utf-8") if with_extra else None
        self.offsets = [0]
        self.n_tokens = 0

    def add(self, ids: list[int], mask: list[int] | None = None, extra: Any = None) -> None:
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        if self.extra is not None:
            self.extra.write(json.dumps(extra, ensure_ascii=False) + "\n")
        self.n_tokens += len(ids)
        self.offsets.append(self.n_tokens)

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None,
                 extras: list | None = None) -> None:
        """Append samples given back to back: `tokens` (n_tokens,) of this writer's dtype, `lengths` (n_samples,)
        summing to n_tokens, `mask` (n_tokens,) uint8 where the writer keeps one, `extras` one per sample where it
        keeps them. The files end up byte for byte as `add` called sample by sample leaves them."""
        self.tokens.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        if self.extra is not None:
            self.extra.writelines(json.dumps(extra, ensure_ascii=False) + "\n" for extra in extras)
        self.offsets.extend((self.n_tokens + np.cumsum(lengths, dtype=np.int64)).tolist())
        self.n_tokens += int(np.sum(lengths, dtype=np.int64))

    def close(self, **meta: Any) -> dict:
        for handle in (self.tokens, self.mask, self.extra):
            if handle is not None:
                handle.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.dir / "index.bin")
        info = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "n_samples": len(self.offsets) - 1,
            "n_tokens": self.n_tokens,
            "dtype": np.dtype(self.dtype).name,
            "vocab_size": self.vocab_size,
            "has_mask": self.mask is not None,
            **meta,
        }
        staged = self.dir / "meta.json.tmp"  # renamed into place: a crash never leaves a half-written meta.json
        staged.write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n")
        os.replace(staged, self.dir / "meta.json")
        return info


class Shard:
    """Read-only view of a prepared directory. Safe to pickle into DataLoader workers (maps lazily)."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        meta_file = self.dir / "meta.json"
        if not meta_file.is_file():
            raise UserError(f"{self.dir}: not a prepared dataset (meta.json is missing; run `minimind prepare`)")
        try:
            self.meta = json.loads(meta_file.read_bytes())
        except ValueError as err:
            raise UserError(f"{meta_file}: not valid JSON ({err}); prepare the data again") from None
        if not isinstance(self.meta, dict) or self.meta.get("format_version") != FORMAT_VERSION:
            version = self.meta.get("format_version") if isinstance(self.meta, dict) else None
            raise UserError(f"{meta_file}: format_version {version} is not supported")
        self.kind = self.meta["kind"]
        self._tokens = self._mask = self._index = None
        self._extra: list | None = None

    def __getstate__(self):  # workers re-open the maps themselves
        return {**self.__dict__, "_tokens": None, "_mask": None, "_index": None}

    def _open(self) -> None:
        if self._index is None:
            self._index = np.fromfile(self.dir / "index.bin", dtype=np.int64)
            dtype = np.dtype(self.meta["dtype"])
            n = self.meta["n_tokens"]
            # np.memmap refuses empty files; a zero-token shard simply has no samples to read
            self._tokens = np.memmap(self.dir / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else None
            if self.meta["has_mask"] and n:
                self._mask = np.memmap(self.dir / "mask.bin", dtype=np.uint8, mode="r", shape=(n,))

    def __len__(self) -> int:
        return self.meta["n_samples"]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(token ids, target mask or None) of sample i, as int64/uint8 arrays."""
        self._open()
        lo, hi = int(self._index[i]), int(self._index[i + 1])
        if self._tokens is None:  # a zero-token shard: every sample is empty
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint8) if self.meta["has_mask"] else None
        ids = np.asarray(self._tokens[lo:hi], dtype=np.int64)
        mask = np.asarray(self._mask[lo:hi]) if self._mask is not None else None
        return ids, mask

    def lengths(self) -> np.ndarray:
        self._open()
        return np.diff(self._index)

    def tokens(self) -> np.ndarray:
        """The whole token stream (memory-mapped, not read)."""
        self._open()
        return self._tokens

    def extra(self, i: int) -> Any:
        if self._extra is None:
            with open(self.dir / "extra.jsonl", encoding="utf-8") as handle:
                self._extra = [json.loads(line) for line in handle]
        return self._extra[i]
