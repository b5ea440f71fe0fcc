"""Response bodies and SSE chunks shaped exactly like OpenAI's chat and text completions, declared once as
pydantic models: the handlers build every body from them and the OpenAPI document (`serve/openapi.py`) shows
the same models."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from minimind.serve.protocol import CalledFunction


class Health(BaseModel):
    """GET /health: whether the scheduler thread runs, and the sequences in flight."""

    status: Literal["ok", "error"]
    active: int


class ModelCard(BaseModel):
    """One served model name, with its context length."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minimind"
    max_model_len: int


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    """Of the prompt tokens, those the prefix cache served (their keys and values were reused, not prefilled)."""

    cached_tokens: int


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    """A token with its log-probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobs(TopLogprob):
    """A sampled token's log-probability and the most likely alternatives (`top_logprobs`)."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """`logprobs` of a chat choice (with `logprobs: true`)."""

    content: list[TokenLogprobs]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """`logprobs` of a text-completion choice (with `logprobs: k`)."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ToolCall(BaseModel):
    """One function call of a chat choice (with `tools`)."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    """The answer of one chat choice: text, or the function calls it makes (content null when it says nothing
    before them)."""

    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # with --reasoning-parser think
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat answer and why it ended."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    """A non-streaming chat answer (`stream` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    """One choice of a text completion and why it ended."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    """A non-streaming text completion (`stream` false)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ToolCallDelta(ToolCall):
    """A function call in a streamed chat answer, whole in one chunk, with its position among the calls."""

    index: int


class ChatDelta(BaseModel):
    """What one chunk adds to a streamed chat answer (the first carries the role)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # with --reasoning-parser think
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    """One choice's part of a streamed chat chunk; the last one carries the finish reason."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat answer; the last one (with `stream_options.include_usage`) has
    empty choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    """One choice's part of a streamed text-completion chunk."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
    """One SSE event of a streamed text completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """OpenAI's `usage` object; `cached_tokens`: of the prompt tokens, those the prefix cache served."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def body_of(model: BaseModel) -> dict:
    """A response model as its JSON body: the fields that were given (an optional one left out stays out, as
    OpenAI's bodies omit it), None included where it was given."""
    return model.model_dump(mode="json", exclude_unset=True)


def sse(data: dict | str | BaseModel) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    if isinstance(data, BaseModel):
        data = body_of(data)
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

    def body(self, texts: list[str | None], finish_reasons: list[str], tokens: Usage,
             logprobs: list[dict | None] | None = None, tool_calls: list[list[dict] | None] | None = None,
             reasoning: list[str | None] | None = None) -> dict:
        """The whole non-streaming response, one choice per text (with its `logprobs` object, if asked, a chat
        choice's `tool_calls`, if it made any, and its `reasoning_content` when thinking is split off), and
        `tokens` as its usage."""
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
                choices.append(ChatChoice(index=i, message=AssistantMessage(**message), logprobs=lp,
                                          finish_reason=reason))
            reply: BaseModel = ChatCompletion(**self._head(False), choices=choices, usage=tokens)
        else:
            reply = Completion(**self._head(False), choices=[
                CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=reason)
                for i, (text, reason, lp) in enumerate(zip(texts, finish_reasons, logprobs))],
                usage=tokens)
        return body_of(reply)

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False, logprobs: dict | None = None, tool_calls: list[dict] | None = None,
              reasoning: str | None = None) -> str:
        """One SSE chunk for choice `index`: a text delta, the opening role (chat), a chat choice's calls
        (whole, each with its position in the list as OpenAI's deltas carry it), a piece of its thinking,
        or the finish reason."""
        extra = {"usage": None} if self.include_usage else {}
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if reasoning is not None:
                delta["reasoning_content"] = reasoning
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [ToolCallDelta(index=k, **call) for k, call in enumerate(tool_calls)]
            choice = ChatChunkChoice(index=index, delta=ChatDelta(**delta), logprobs=logprobs,
                                     finish_reason=finish_reason)
            return sse(ChatCompletionChunk(**self._head(True), choices=[choice], **extra))
        choice = CompletionChunkChoice(index=index, text=text or "", logprobs=logprobs, finish_reason=finish_reason)
        return sse(CompletionChunk(**self._head(True), choices=[choice], **extra))

    def usage_chunk(self, tokens: Usage) -> str:
        """The last chunk before [DONE] when `stream_options.include_usage` is set."""
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return sse(kind(**self._head(True), choices=[], usage=tokens))
