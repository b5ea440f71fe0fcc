"""A preallocated, row-per-sequence ("ragged") KV cache for the Engine.

Per layer, keys and values live in one tensor each, (rows, n_kv_heads, capacity + 1, head_dim). Row r holds
one sequence and the token at position p of that sequence lives in column p, so a row's cache is always the
prefix [0, length_r) and rows may have different lengths: a batch mixes sequences of any lengths without left
padding, and a sequence can take a free row (prefill) or give its row back between decode steps (continuous
batching). The last column is scratch: padding tokens of a batched prefill write there, and it is never read.

The model talks to the cache through the duck-typed HF interface: attention calls `update(k, v, layer_idx)`
with the new (B, n_kv_heads, T, head_dim) keys/values and attends over what it returns; the model body calls
`get_seq_length()`. Before each forward the engine says which rows the batch covers and where each new token
goes (`bind`); the cache writes with one indexed store per layer — no `torch.cat` of the whole cache — and
returns views, never copies. Space grows by reallocation (`reserve`), which happens only when a longer or a
larger batch arrives, not per step.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys/values of up to `rows` sequences, each row its own sequence at its own length."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.rows = 0
        self.capacity = 0  # columns usable by real tokens; column `capacity` is the scratch column
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(0, 0)
        self.bind(0, 0, torch.zeros(0, 1, dtype=torch.long, device=self.device), 0, 0)

    def _alloc(self, rows: int, capacity: int) -> None:
        shape = (rows, self.n_kv_heads, capacity + 1, self.head_dim)
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        new_values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        keep_rows, keep_cols = min(rows, self.rows), min(capacity, self.capacity)
        for old, new in zip(self.keys + self.values, new_keys + new_values):
            new[:keep_rows, :, :keep_cols] = old[:keep_rows, :, :keep_cols]
        self.keys, self.values = new_keys, new_values
        self.rows, self.capacity = rows, capacity
        self._row_numbers = torch.arange(rows, device=self.device)[:, None]  # (rows, 1)

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor,
             past: int) -> SlotKVCache:
        """A cache over the given per-layer tensors, bound to rows [0, B): row b writes at `positions[b]` (B, T),
        and every column is read (the caller's mask says how many). How the packaged decode steps (compiled.py)
        see the cache tensors they are handed; the tensors are used, not copied."""
        cache = cls.__new__(cls)
        rows, n_kv_heads, columns, head_dim = keys[0].shape
        cache.n_layers, cache.n_kv_heads, cache.head_dim = len(keys), n_kv_heads, head_dim
        cache.dtype, cache.device = keys[0].dtype, keys[0].device
        cache.rows, cache.capacity = rows, columns - 1
        cache.keys, cache.values = list(keys), list(values)
        batch = positions.shape[0]
        cache._row_numbers = torch.arange(batch, device=cache.device)[:, None]  # (B, 1)
        cache.bind(0, batch, positions, None, past)
        return cache

    def reserve(self, rows: int, columns: int, max_rows: int, max_columns: int) -> None:
        """Make room for `rows` sequences of up to `columns` tokens, keeping what is stored.

        Grows geometrically (doubling what grows, but never past `max_rows` / `max_columns` unless asked
        for more) so a stream of slightly longer requests costs a logarithmic number of reallocations.
        """
        if rows <= self.rows and columns <= self.capacity:
            return
        new_rows = self.rows if rows <= self.rows else max(rows, min(2 * self.rows, max_rows))
        new_cols = self.capacity if columns <= self.capacity else max(columns, min(2 * self.capacity, max_columns))
        self._alloc(new_rows, new_cols)

    def bind(self, start: int, stop: int, write_positions: torch.Tensor, kv_len: int | None, past: int) -> None:
        """Aim the next forward at rows [start, stop).

        write_positions: (B, T) column of each new token, `self.capacity` (scratch) for padding tokens.
        kv_len: how many columns attention reads (the longest row after the write); None hands attention every
            column, scratch included, for a caller whose mask says how many to read (the compiled step).
        past: the longest row before the write, reported by `get_seq_length`.
        """
        self._start, self._stop = start, stop
        self._write_positions = write_positions
        self._row_index = self._row_numbers[start:stop]  # (B, 1) absolute row numbers, broadcast over T
        self._kv_len, self._past = kv_len, past

    def clear(self) -> None:
        """Drop every row and column, giving the memory back; the next `reserve` allocates afresh."""
        self._alloc(0, 0)

    @property
    def scratch_column(self) -> int:
        """The column padding tokens write to; never attended."""
        return self.capacity

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store (B, n_kv_heads, T, head_dim) new keys/values; return (B, n_kv_heads, kv_len, head_dim) views."""
        # Advanced indices on dims 0 and 2 put the (B, T) index dims first: the target is (B, T, H, D). The store
        # goes into the whole tensor, not a row slice: under torch.compile a store into a view of an input is
        # made on a copy of the whole cache that is then copied back, every layer of every step.
        self.keys[layer_idx][self._row_index, :, self._write_positions] = key.transpose(1, 2)
        self.values[layer_idx][self._row_index, :, self._write_positions] = value.transpose(1, 2)
        keys = self.keys[layer_idx][self._start:self._stop]
        values = self.values[layer_idx][self._start:self._stop]
        if self._kv_len is None:
            return keys, values
        return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest stored sequence among the bound rows before the current forward."""
        return self._past

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Move the first `length` columns of row `src` into row `dst` (used to keep active rows contiguous)."""
        for tensor in self.keys + self.values:
            tensor[dst, :, :length] = tensor[src, :, :length]
