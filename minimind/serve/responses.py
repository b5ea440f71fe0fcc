"""Response bodies and SSE chunks shaped exactly like OpenAI's chat and text completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


@dataclass
class Reply:
    """The id, timestamp and model shared by every chunk (or the one body) of one response.

    `chat` selects chat.completion(.chunk) bodies with `message`/`delta`, else text_completion with `text`.
    With `include_usage` every chunk carries `"usage": null` and `usage_chunk` gives the final one with
    empty choices, as OpenAI streams them.
    """

    model: str
    chat: bool
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, texts: list[str | None], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
             logprobs: list[dict | None] | None = None, tool_calls: list[list[dict] | None] | None = None,
             reasoning: list[str | None] | None = None) -> dict:
        """The whole non-streaming response, one choice per text (with its `logprobs` object, if asked, a chat
        choice's `tool_calls`, if it made any, and its `reasoning_content` when thinking is split off)."""
        logprobs = logprobs or [None] * len(texts)
        tool_calls = tool_calls or [None] * len(texts)
        if self.chat:
            choices = []
            for i, (text, reason, lp, calls) in enumerate(zip(texts, finish_reasons, logprobs, tool_calls)):
                message = {"role": "assistant", "content": text}
                if reasoning is not None:
                    message["reasoning_content"] = reasoning[i]
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        else:
            choices = [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
                       for i, (text, reason, lp) in enumerate(zip(texts, finish_reasons, logprobs))]
        return {**self._head(False), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False, logprobs: dict | None = None, tool_calls: list[dict] | None = None,
              reasoning: str | None = None) -> str:
        """One SSE chunk for choice `index`: a text delta, the opening role (chat), a chat choice's calls
        (whole, each with its position in the list as OpenAI's deltas carry it), a piece of its thinking,
        or the finish reason."""
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if reasoning is not None:
                delta["reasoning_content"] = reasoning
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        data = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            data["usage"] = None
        return sse(data)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The last chunk before [DONE] when `stream_options.include_usage` is set."""
        return sse({**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
