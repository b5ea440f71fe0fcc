"""Function calls read out of each choice's reply, whole or while it streams.

A chat request with `tools` (and `tool_choice` other than "none") shows the model the functions through the
chat template; its reply is text, then `<tool_call>` blocks (`tokenizer/tool_calls.py`). The server answers
such a reply as OpenAI does: `message.tool_calls` with JSON-text arguments, content the text before the calls
(null when there is none), finish_reason "tool_calls". While streaming, text goes out as it comes up to the
first sign of a call; the rest is held until the choice finishes, then sent as one `tool_calls` delta, or as
text if it does not parse.
"""

from __future__ import annotations

import uuid

from minimind.tokenizer.tool_calls import ToolCall, parse_tool_calls, safe_text_end


def openai_tool_calls(calls: list[ToolCall]) -> list[dict]:
    """OpenAI's `tool_calls` entries, each with a fresh id."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for call in calls]


class ToolCallReader:
    """Per choice: the reply so far, how much of it went out as text, and at the end the calls it holds."""

    def __init__(self, choices: int, names: frozenset[str], parallel: bool = True):
        self.texts = [""] * choices
        self.sent = [0] * choices
        self.names, self.parallel = names, parallel

    def feed(self, index: int, text: str) -> str:
        """Add generated text; -> what can be sent as text now."""
        self.texts[index] += text
        end = safe_text_end(self.texts[index])
        out = self.texts[index][self.sent[index] : end] if end > self.sent[index] else ""
        self.sent[index] += len(out)
        return out

    def finish(self, index: int) -> tuple[str, list[dict] | None]:
        """-> (text not sent yet, the calls) when the choice is done; calls None if the reply makes none."""
        parsed = parse_tool_calls(self.texts[index], self.names)
        if parsed is None:
            return self.texts[index][self.sent[index] :], None
        return "", self._calls(parsed[1])

    def message(self, reply: str) -> tuple[str | None, list[dict] | None]:
        """-> (content, calls) of a whole reply, for a non-streaming response; content None beside calls when
        the model said nothing first, as OpenAI answers."""
        parsed = parse_tool_calls(reply, self.names)
        if parsed is None:
            return reply, None
        return parsed[0] or None, self._calls(parsed[1])

    def _calls(self, calls: list[ToolCall]) -> list[dict]:
        return openai_tool_calls(calls if self.parallel else calls[:1])
