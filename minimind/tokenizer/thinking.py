"""The thinking switch of chat templates that have one, and where a rendered prompt leaves the model's thinking.

Qwen3-style templates (minimind-3's among them) take a template variable that decides whether the model thinks
before it answers: minimind-3's is `open_thinking` (off unless true), Qwen3's `enable_thinking` (on unless
false). With thinking on, the generation prompt ends by opening a think block (`…<think>\n`) and the reply
starts inside it; with thinking off it ends with an empty, closed block (`…<think>\n\n</think>\n\n`) and the
reply is all answer. `thinking_kwargs` sets both names, so one switch works whichever the template reads; a
template without either variable renders the same prompt either way (`has_thinking_switch` tells).
"""

from __future__ import annotations

import enum

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SWITCH_NAMES = ("open_thinking", "enable_thinking")  # minimind-3's variable, Qwen3's


class PromptThinking(enum.Enum):
    """How a rendered chat prompt ends, as far as the reply's thinking goes."""

    REPLY = "reply"  # the prompt says nothing: a reply that opens with <think> thinks first
    OPEN = "open"  # the prompt opened a think block: the reply starts inside it, up to </think>
    CLOSED = "closed"  # the prompt closed a (usually empty) think block: the reply is all answer


def thinking_kwargs(on: bool | None) -> dict[str, bool]:
    """The chat-template arguments that turn thinking on or off (None: the template's own default)."""
    return {} if on is None else dict.fromkeys(SWITCH_NAMES, on)


def has_thinking_switch(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a different generation prompt with thinking on than off."""
    question = [{"role": "user", "content": "hi"}]
    try:
        on, off = (tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True,
                                                 **thinking_kwargs(value)) for value in (True, False))
    except Exception:  # noqa: BLE001 - a template that fails on a plain question has no usable switch
        return False
    return on != off


def prompt_thinking(prompt: str) -> PromptThinking:
    """Where a rendered prompt (its text, or at least its last tokens decoded) leaves the reply's thinking."""
    tail = prompt.rstrip()
    if tail.endswith(THINK_OPEN):
        return PromptThinking.OPEN
    if tail.endswith(THINK_CLOSE):
        return PromptThinking.CLOSED
    return PromptThinking.REPLY


def prompt_ids_thinking(tokenizer, ids: list[int]) -> PromptThinking:
    """`prompt_thinking` of a prompt given as token ids (only its last tokens are decoded)."""
    return prompt_thinking(tokenizer.decode(ids[-16:], skip_special_tokens=False))
