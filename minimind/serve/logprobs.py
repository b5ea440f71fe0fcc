"""`logprobs` in OpenAI's two shapes, from the engine's `TokenLogprob`s.

Chat completions (`logprobs: true`, `top_logprobs: k`): choice.logprobs = {"content": [{"token", "logprob",
"bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...], "refusal": null}.
Text completions (`logprobs: k`): choice.logprobs = {"tokens", "token_logprobs", "top_logprobs": [{token:
logprob}, ...], "text_offset"}.

A token's `bytes` are its exact UTF-8 bytes (a byte-level BPE token may hold part of a character; its `token`
string then shows U+FFFD for the missing part). The log-probabilities are the model's raw distribution
(before penalties, temperature and top-k/top-p), as vLLM reports them by default; one that is not finite is
sent as -9999.0, as OpenAI does, since JSON has no -Infinity. Every sampled token is listed except the
end-of-sequence token that finishes a chat choice (a text completion lists it). `text_offset` is where each
token starts in the choice's text: a character whose bytes are split over tokens counts once, at the token
that completes it (adding up the token strings would count one U+FFFD per piece and drift).
With `echo`, a text completion's logprobs start with the prompt's tokens, the first one's log-probability
null (nothing predicts it), as OpenAI's do: the way lm-evaluation-harness scores a continuation over the API.
"""

from __future__ import annotations

import codecs
import json
import math
from functools import lru_cache

from minimind.infer.sampling import TokenLogprob


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:  # bytes without a printable form are shifted past 255, in order
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TextOffsets:
    """Character offsets of successive tokens in the text their bytes decode to, for one choice."""

    def __init__(self) -> None:
        self.chars = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, data: bytes) -> int:
        """-> the offset of a token with these bytes; moves past the characters they complete."""
        offset = self.chars
        self.chars += len(self.decoder.decode(data))
        return offset


class LogprobFormatter:
    """Turns `TokenLogprob`s into OpenAI's JSON for one tokenizer (used on the event loop's tokenizer copy)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        try:
            decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        except (AttributeError, ValueError):
            decoder = {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        self.alphabet = _byte_level_alphabet()
        self.token_bytes = lru_cache(maxsize=65536)(self._token_bytes)

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_level and piece is not None and all(c in self.alphabet for c in piece):
            return bytes(self.alphabet[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")  # special tokens, other tokenizers

    def token(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            return {"token": self.token(token_id), "logprob": _finite(logprob),
                    "bytes": list(self.token_bytes(token_id))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion(self, entries: list[tuple[int, TokenLogprob | None]], offsets: TextOffsets) -> dict:
        """Legacy shape for (token id, its entry) pairs; the entry is None for an echoed prompt's first token,
        which nothing predicts. `offsets`: the choice's text so far (advanced past these tokens)."""
        tokens = [self.token(token_id) for token_id, _ in entries]
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else _finite(e.logprob) for _, e in entries],
                "top_logprobs": [None if e is None else {self.token(t): _finite(lp) for t, lp in e.top}
                                 for _, e in entries],
                "text_offset": [offsets.advance(self.token_bytes(token_id)) for token_id, _ in entries]}
