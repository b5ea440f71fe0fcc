"""Conversations -> token ids and a loss mask, through the tokenizer's own chat template.

The mask marks what the model should learn to say: the content of every assistant turn and the end-of-turn
token that closes it (seed §2.3.1's worked example), nothing of system/user turns or of the role headers.
It is found from the template itself, not from hard-coded markers: the assistant turn i occupies the text
between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]), cut just after the
eos token. Any prefix-stable ChatML-style template works, ours, MiniMind2's or one with <|im_end|> markers.
"""

from __future__ import annotations

from minimind.data.records import BadRecord, Messages


def render(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The chat as text; functions offered (`records`' "functions" on the first turn) go in as `tools`, the
    argument every tool-aware template reads."""
    tools = messages[0].get("functions") if messages else None
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Messages, text: str) -> list[tuple[int, int]]:
    """Character ranges [start, end) of each assistant turn's content plus its closing eos, within `text`."""
    eos = tokenizer.eos_token or ""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or len(upto) < start:
            raise BadRecord("the tokenizer's chat template does not render conversations prefix-stably")
        end = len(upto)
        close = text.rfind(eos, start, end) if eos else -1
        if close >= 0:
            end = close + len(eos)  # keep the eos, drop what follows it (the newline between turns)
        spans.append((start, end))
    return spans


def encode_conversation(tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    """-> (token ids of the rendered chat, target mask with 1 on assistant content + its eos).

    BadRecord for the shapes no template can split into turns (transformers renders no empty prefix).
    """
    if not messages or messages[0]["role"] == "assistant":
        raise BadRecord("a conversation needs a system or user turn before its first assistant turn")
    text = render(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans = assistant_spans(tokenizer, messages, text)
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
