"""Conversations -> token ids and a loss mask, through the tokenizer's own chat template.

The mask marks what the model should learn to say: the content of every assistant turn and the end-of-turn
token that closes it, nothing of system/user/tool turns or of the role headers.
It is found from the template itself, not from hard-coded markers: the assistant turn i occupies the text
between render(messages[:i]) + the assistant header and render(messages[:i+1]), cut just after the eos token.
The header is what the generation prompt adds, up to a `<think>` it opens: minimind-3's template puts a think
block on every assistant turn (`<think>\n…\n</think>\n\n`) and its generation prompt pre-fills an empty one, so
the block is part of the reply and learned, reasoning or not. Any prefix-stable ChatML-style template works:
ours, MiniMind2's, minimind-3's or one with other markers; one whose assistant turn does not start with its
generation prompt's header, or does not end with the eos token, cannot be masked (UserError).

`ChatAugment` is the SFT loader's optional augmentation of minimind-3's recipe: a random system prompt for a share
of the chats without tools, and the empty think block taken out of a share of rendered chats; the choice for
each line follows from (seed, line number) alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from minimind.errors import UserError
from minimind.records import BadRecord, Messages
from minimind.tokenizer.template import EMPTY_THINK

THINK_OPEN = "<think>"


def render(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The chat as text; functions offered (`records`' "functions" on the first turn) go in as `tools`, the
    argument every tool-aware template reads."""
    tools = messages[0].get("functions") if messages else None
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Messages, text: str) -> list[tuple[int, int]]:
    """Character ranges [start, end) of each assistant turn's reply (its think block included) plus its closing
    eos, within `text`."""
    eos = tokenizer.eos_token or ""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i])
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = text if i + 1 == len(messages) else render(tokenizer, messages[: i + 1])
        if not (prompt.startswith(before) and upto.startswith(before) and text.startswith(upto)):
            raise BadRecord("the tokenizer's chat template does not render conversations prefix-stably")
        header = prompt[len(before):]
        if THINK_OPEN in header:
            header = header[: header.index(THINK_OPEN)]  # a pre-filled think block belongs to the reply
        if not upto.startswith(header, len(before)):
            raise UserError(f"{_name(tokenizer)}: the chat template's generation prompt {header!r} does not open the "
                            "assistant turns it renders, so the loss mask cannot find the replies")
        start = len(before) + len(header)
        close = text.rfind(eos, start, len(upto)) if eos else -1
        if close < 0:
            raise UserError(f"{_name(tokenizer)}: the chat template does not close an assistant turn with the "
                            f"eos token {eos!r}, which the loss mask needs so the model learns to stop")
        spans.append((start, close + len(eos)))  # keep the eos, drop what follows it (the newline between turns)
    return spans


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the tokenizer"


def drop_empty_think(text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """`text` without its empty think blocks, and `spans` moved to match (a span keeps what is left of it)."""
    cuts = []  # start of each removed block in `text`
    at = text.find(EMPTY_THINK)
    while at >= 0:
        cuts.append(at)
        at = text.find(EMPTY_THINK, at + len(EMPTY_THINK))
    if not cuts:
        return text, spans

    def moved(pos: int) -> int:
        shift = 0
        for cut in cuts:
            if pos <= cut:
                break
            shift += min(len(EMPTY_THINK), pos - cut)
        return pos - shift

    return text.replace(EMPTY_THINK, ""), [(moved(start), moved(end)) for start, end in spans]


# The system prompts `ChatAugment` draws from (our wording).
SYSTEM_PROMPTS = (
    "你是MiniMind，一个乐于助人的AI助手。",
    "你是一个知识丰富、回答简洁准确的AI助手。",
    "你是MiniMind，请用清晰、友好的语言回答用户的问题。",
    "You are MiniMind, a small and helpful AI assistant.",
    "You are a helpful assistant. Answer accurately and concisely.",
    "You are a friendly assistant who explains things step by step.",
)


@dataclass(frozen=True)
class ChatAugment:
    """The SFT loader's augmentations, as minimind-3's loader names them: a random system prompt for a share
    `add_system_ratio` of the chats that have no system turn and no tools (0 = off), and the empty think blocks
    kept in a share `empty_think_ratio` of rendered chats, removed from the rest (1 = off; their recipe keeps 0.2,
    so 80% of chats lose them). Line n's choice depends only on (seed, n)."""

    add_system_ratio: float = 0.0
    empty_think_ratio: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for flag, ratio in (("--add-system-ratio", self.add_system_ratio),
                            ("--empty-think-ratio", self.empty_think_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise UserError(f"{flag} must be between 0 and 1, got {ratio}")

    @property
    def active(self) -> bool:
        return self.add_system_ratio > 0 or self.empty_think_ratio < 1

    def key(self) -> str:
        """What a prepared cache must match (empty when off, so the cache of unaugmented data is unchanged)."""
        return f"aug{self.add_system_ratio:g}-{self.empty_think_ratio:g}-{self.seed}" if self.active else ""

    def apply(self, messages: Messages, line: int) -> tuple[Messages, bool]:
        """-> (the messages, a system prompt added if drawn; whether to drop the empty think blocks)."""
        rng = random.Random(f"{self.seed}:{line}")
        add_system, system, drop = rng.random(), rng.choice(SYSTEM_PROMPTS), rng.random()
        if add_system < self.add_system_ratio and messages[0]["role"] != "system" \
                and not any(m.get("functions") for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        return messages, drop >= self.empty_think_ratio


def encode_conversation(tokenizer, messages: Messages, no_empty_think: bool = False) -> tuple[list[int], list[int]]:
    """-> (token ids of the rendered chat, target mask with 1 on assistant content + its eos).

    `no_empty_think`: the empty `<think>\n\n</think>\n\n` blocks are taken out of the rendered text first.
    BadRecord for the shapes no template can split into turns (transformers renders no empty prefix).
    """
    if not messages or messages[0]["role"] == "assistant":
        raise BadRecord("a conversation needs a system or user turn before its first assistant turn")
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    if no_empty_think:
        text, spans = drop_empty_think(text, spans)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    mask = [0] * len(ids)
    span_i = 0
    for t, (s, e) in enumerate(offsets):
        while span_i < len(spans) and s >= spans[span_i][1]:
            span_i += 1
        if span_i == len(spans):
            break
        start, end = spans[span_i]
        if s >= start and e <= end and e > s:
            mask[t] = 1
    return ids, mask


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header, ready for generation."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
