"""From a growing list of token ids to text that is safe to show: whole characters only, stop strings cut.

Byte-level BPE can split one Chinese character (3 UTF-8 bytes) over several tokens; decoding such a prefix
gives U+FFFD. `TextStream` therefore holds tokens back until their bytes complete a character. Decoding is
incremental: only the tokens since the last complete boundary are decoded, together with the token before
them as context (a SentencePiece-style tokenizer decodes a lone token without its leading space), so a step
costs O(1) whatever the length so far. Bytes that never complete a character (a small or undertrained model
emits them) would hold the window open for ever and make every step decode the whole tail: once more than
`MAX_PENDING` tokens are held, everything but the newest `UTF8_TAIL` tokens is shown, invalid bytes as
U+FFFD as `decode` renders them. (A character has at most 4 bytes and a token at least one, so real text
reaches a character boundary within a few tokens; the bound is generous because byte-level BPE may merge
across characters.)

Stop strings: after each new piece the text is searched for any stop string (only where a new match can
start). On a match the text is cut before it. Without a match, the longest suffix that is a prefix of some
stop string is held back — it may become a stop string with the next token — so streamed text never has to
be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
MAX_PENDING = 32  # tokens held back waiting for a character to complete, at most
UTF8_TAIL = 3  # tokens still held back past that: the most bytes an unfinished character can have


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `stops`."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """Incremental detokenizer with stop strings for one sequence.

    `push(token_id)` returns (text delta, stopped); `finish()` returns whatever was held back. The deltas
    concatenate to `text`, the final answer.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stops = tuple(stop)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._context = 0  # first id of the decode window (one token of context before `_pending`)
        self._pending = 0  # first id whose text is not yet in `decoded`
        self._context_text = ""  # decoded ids[_context:_pending], the part of a window already in `decoded`
        self.decoded = ""  # text of every complete character so far (cut at a stop string once stopped)
        self.emitted = 0  # how much of `decoded` has been handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token; -> (text now safe to show, whether a stop string was reached)."""
        if self.stopped:
            raise RuntimeError("TextStream.push after a stop string was reached")
        self.ids.append(token_id)
        end = len(self.ids)
        after = self._decode(self.ids[self._context :])
        forced = after.endswith(REPLACEMENT)
        if forced:
            if end - self._pending <= MAX_PENDING:
                return "", False  # a character is still incomplete
            end -= UTF8_TAIL  # these bytes are not one unfinished character: show all but the newest
            after = self._decode(self.ids[self._context : end])
        if len(after) <= len(self._context_text):
            return "", False  # nothing new
        start = len(self.decoded)
        self.decoded += after[len(self._context_text) :]
        self._advance_window(end, end - 1 if forced else self._pending)  # a forced cut keeps one token
        if self.stops:
            return self._check_stops(start)
        return self._take(len(self.decoded)), False

    def _check_stops(self, start: int) -> tuple[str, bool]:
        window = max(0, start - self.longest_stop + 1)  # a new match must end in the new piece
        hits = [i for i in (self.decoded.find(s, window) for s in self.stops) if i >= 0]
        if hits:
            self.decoded = self.decoded[: min(hits)]
            self.stopped = True
            return self._take(len(self.decoded)), True
        return self._take(len(self.decoded) - held_back(self.decoded, self.stops)), False

    def _take(self, end: int) -> str:
        piece = self.decoded[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def finish(self) -> str:
        """The rest at the end of generation: held-back text and any incomplete trailing bytes (as U+FFFD)."""
        if not self.stopped:
            self.decoded += self._decode(self.ids[self._context :])[len(self._context_text) :]
            self._advance_window(len(self.ids), self._pending)
        return self._take(len(self.decoded))

    def _advance_window(self, end: int, context: int) -> None:
        """ids[:end] are decoded; ids[context:end] (the new piece) are the context of the next tokens."""
        self._context, self._pending = context, end
        self._context_text = self._decode(self.ids[self._context : self._pending])

    @property
    def text(self) -> str:
        """Everything decoded so far (the final answer once `finish` has run)."""
        return self.decoded
