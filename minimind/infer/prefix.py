"""Prefix caching for the Engine: finished sequences' keys/values kept, so a prompt that starts the same way skips
prefilling what they share.

    engine = Engine(model, tokenizer, prefix_cache_tokens=8192)   # `--prefix-cache-tokens` on the CLI
    engine.chat(history + [question])    # the next turn prefills only what follows the cached history

When a request leaves its KV-cache row (finished or cancelled), the tokens its row holds — prompt and output,
all but the last sampled token, which was never fed back — and their keys/values are copied into an entry
here. A new prompt looks for the entry sharing its longest common prefix; the engine copies that many columns
into the prompt's row and prefills the rest at positions len(prefix), len(prefix) + 1, ... — the positions
the whole prompt would have given them, so RoPE (plain, YaRN) and QK-norm see the same inputs. At least the
prompt's last token is always prefilled, since its logits give the first new token.

Entries are whole sequences, one per finished request; an entry that is a prefix of a newer one is dropped
(the newer covers it: the common case of a chat's previous turn). The bound counts tokens over all entries;
the least recently used entries are evicted first, and a sequence longer than the bound keeps its first
`max_tokens` tokens. The reused values are the ones the earlier request computed (in its prefill and its
decode steps), so they can differ from a fresh prefill's in the last floating-point bits: greedy tokens match,
log-probabilities agree to rounding. An engine with int8 or int4 weights keeps no prefix cache (their matmuls
round activations one way for a few rows and another for many, int8 with one scale per call, so values from
another forward differ by more than that), nor does a request
that scores its prompt (`prompt_logprobs` needs the logits of every prompt position).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from minimind.infer.cache import SlotKVCache


@dataclass
class _Entry:
    tokens: torch.Tensor  # (L,) int64 on the CPU: the token ids the keys/values belong to
    kv: torch.Tensor  # (n_layers, 2, n_kv_heads, L, head_dim): keys then values per layer


@dataclass
class PrefixStats:
    """What the prefix cache saved so far (counters never reset) and holds now."""

    query_tokens: int  # prompt tokens of requests prefilled
    hit_tokens: int  # of those, taken from the cache instead of prefilled
    entries: int
    tokens: int  # tokens held
    bytes: int  # memory those tokens' keys/values take


class PrefixCache:
    """Keys/values of finished sequences, least recently used evicted first, at most `max_tokens` tokens."""

    def __init__(self, max_tokens: int, bytes_per_token: int):
        if max_tokens < 1:
            raise ValueError(f"prefix cache max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens, self.bytes_per_token = max_tokens, bytes_per_token
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self._next_key = 0
        self._tokens = 0
        self.query_tokens = self.hit_tokens = 0

    @classmethod
    def for_cache(cls, max_tokens: int, cache: SlotKVCache) -> PrefixCache:
        """A prefix cache sized for `cache`'s layers, heads and dtype."""
        element = torch.empty((), dtype=cache.dtype).element_size()
        return cls(max_tokens, 2 * cache.n_layers * cache.n_kv_heads * cache.head_dim * element)

    @property
    def stats(self) -> PrefixStats:
        """Counters and current size."""
        return PrefixStats(self.query_tokens, self.hit_tokens, len(self._entries), self._tokens,
                           self._tokens * self.bytes_per_token)

    def clear(self) -> None:
        """Drop every entry (the weights changed, or the cache memory is given back); counters stay."""
        self._entries.clear()
        self._tokens = 0

    def match(self, prompt_ids: list[int]) -> tuple[int | None, int]:
        """(entry key, tokens reusable) for the entry sharing the longest prefix with the prompt, at most
        len(prompt) - 1 tokens; (None, 0) when nothing is shared. Counts the query; a hit becomes most recent."""
        self.query_tokens += len(prompt_ids)
        limit = len(prompt_ids) - 1
        if limit < 1 or not self._entries:
            return None, 0
        prompt = torch.tensor(prompt_ids[:limit])
        best_key, best = None, 0
        for key, entry in self._entries.items():
            shared = _common_prefix(prompt, entry.tokens)
            if shared > best:
                best_key, best = key, shared
        if best_key is not None:
            self._entries.move_to_end(best_key)
            self.hit_tokens += best
        return best_key, best

    def load(self, key: int, length: int, cache: SlotKVCache, row: int) -> None:
        """Copy the first `length` tokens of entry `key` into columns [0, length) of `cache` row `row`."""
        kv = self._entries[key].kv
        for layer, (keys, values) in enumerate(zip(cache.keys, cache.values)):
            keys[row, :, :length] = kv[layer, 0, :, :length]
            values[row, :, :length] = kv[layer, 1, :, :length]

    def store(self, token_ids: list[int], cache: SlotKVCache, row: int) -> None:
        """Keep `cache` row `row`'s first len(token_ids) columns (those tokens' keys/values) as an entry."""
        length = min(len(token_ids), self.max_tokens)
        if length < 2:  # a one-token entry can never be reused (the last prompt token is always prefilled)
            return
        tokens = torch.tensor(token_ids[:length])
        for key, entry in list(self._entries.items()):
            shared = _common_prefix(tokens, entry.tokens)
            if shared == len(entry.tokens):  # covered by the new entry
                self._drop(key)
            elif shared == length:  # the new sequence is already held: refresh that entry instead
                self._entries.move_to_end(key)
                return
        while self._entries and self._tokens + length > self.max_tokens:
            self._drop(next(iter(self._entries)))
        kv = torch.stack([torch.stack([keys[row, :, :length], values[row, :, :length]])
                          for keys, values in zip(cache.keys, cache.values)])  # (n_layers, 2, H, L, D), a copy
        self._entries[self._next_key] = _Entry(tokens, kv)
        self._next_key += 1
        self._tokens += length

    def _drop(self, key: int) -> None:
        self._tokens -= len(self._entries.pop(key).tokens)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
