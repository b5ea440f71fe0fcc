"""`minimind serve --reasoning-parser think`: a reply's thinking goes in `reasoning_content`, the rest in `content`.

Reasoning models (our distill stage, DeepSeek-R1-style data) write `<think>…</think>` before the answer, ours
with the answer in `<answer>…</answer>`. With the parser on, a chat choice answers as DeepSeek's API and
vLLM's reasoning parsers do: `message.reasoning_content` holds what was inside the think block and
`message.content` the answer without its tags; streamed, the thinking arrives as `delta.reasoning_content`
chunks before the content chunks. A reply that does not open with `<think>` is all content. While streaming,
a trailing piece that may still become a tag is held back, so both fields only ever grow by what was sent.

Templates with a thinking switch (minimind-3's `open_thinking`, Qwen3's `enable_thinking`, sent in a request's
`chat_template_kwargs`) move the think tags into the prompt, as vLLM's qwen3 parser expects: a prompt that
ends by opening `<think>` makes the reply start inside the block (reasoning up to `</think>`, then content),
and a prompt that ends with a closed, empty block makes the reply all content. So is a reply a grammar shapes
from its first token (a JSON `response_format`, vLLM's guided_* fields, required tool calls).
"""

from __future__ import annotations

from minimind.tokenizer.thinking import THINK_CLOSE, THINK_OPEN, PromptThinking

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def split_reply(text: str, final: bool = True,
                prompt: PromptThinking = PromptThinking.REPLY) -> tuple[str | None, str]:
    """-> (reasoning or None, content) of a reply; with `final` False (a reply still growing) a trailing piece
    that may become a tag is left out of both. `prompt`: where the prompt left the thinking."""
    if prompt is PromptThinking.OPEN:
        return _inside_thinking(text, final)
    stripped = text.lstrip()
    if prompt is PromptThinking.CLOSED:
        return None, _answer(stripped, final)
    if not stripped.startswith(THINK_OPEN):
        if not final and THINK_OPEN.startswith(stripped):  # nothing yet, or a think block still opening
            return None, ""
        return None, _answer(stripped, final)
    thinking, closed, rest = stripped[len(THINK_OPEN) :].partition(THINK_CLOSE)
    if not closed:
        return _held(thinking, THINK_CLOSE, final), ""
    return thinking, _answer(rest.lstrip(), final)


def _inside_thinking(text: str, final: bool) -> tuple[str | None, str]:
    """A reply whose think block the prompt opened: thinking up to `</think>`, then the answer. A `<think>` the
    model writes again at the start is dropped."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        text = stripped[len(THINK_OPEN) :]
    elif not final and THINK_OPEN.startswith(stripped):  # nothing yet, or a repeated <think> still arriving
        return None, ""
    thinking, closed, rest = text.partition(THINK_CLOSE)
    if not closed:
        return _held(thinking, THINK_CLOSE, final), ""
    return thinking, _answer(rest.lstrip(), final)


def _answer(text: str, final: bool) -> str:
    """The answer part: without an opening `<answer>`, and up to its `</answer>`."""
    if text.startswith(ANSWER_OPEN):
        text = text[len(ANSWER_OPEN) :]
    elif not final and ANSWER_OPEN.startswith(text):
        return ""
    return _held(text.partition(ANSWER_CLOSE)[0], ANSWER_CLOSE, final)


def _held(text: str, tag: str, final: bool) -> str:
    """`text` short of a trailing piece that may still become `tag` (nothing held once the reply is final)."""
    if final:
        return text
    for keep in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-keep:]):
            return text[:-keep]
    return text


class ReasoningSplitter:
    """Per streamed choice: the reply so far, and how much of its reasoning and content went out."""

    def __init__(self, choices: int, prompt: PromptThinking = PromptThinking.REPLY):
        self.texts = [""] * choices
        self.sent = [("", "")] * choices
        self.prompt = prompt  # where the prompt (the same for every choice) left the thinking

    def feed(self, index: int, text: str, final: bool) -> tuple[str, str]:
        """Add generated text; -> (reasoning, content) to send now (`final`: the choice has finished)."""
        self.texts[index] += text
        reasoning, content = split_reply(self.texts[index], final, self.prompt)
        reasoning = reasoning or ""
        sent_reasoning, sent_content = self.sent[index]
        self.sent[index] = (reasoning, content)
        return reasoning[len(sent_reasoning) :], content[len(sent_content) :]
