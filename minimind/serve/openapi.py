"""The server's OpenAPI document, accurate enough for clients and schema-driven fuzzers (schemathesis).

The /v1 handlers read the raw body themselves (size limit, strict types, OpenAI-style 400s), so FastAPI cannot
see their request models; this module puts them in: each POST's request body is its pydantic model's JSON
schema, every response the server can give is listed with its body, and FastAPI's default 422 (which the
app never sends: schema errors are 400s) is dropped. The response models here only document; the handlers
build their bodies in `responses.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from minimind.serve.protocol import ChatCompletionRequest, CompletionRequest
from minimind.serve.responses_api import ResponseObject, ResponsesRequest, ResponseStreamEvent


class ErrorDetail(BaseModel):
    """The fields of an error: what went wrong, its kind, the request field at fault, a machine code."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


class Health(BaseModel):
    """GET /health: whether the scheduler thread runs, and the sequences in flight."""

    status: Literal["ok", "error"]
    active: int


class ModelCard(BaseModel):
    """One served model name, with its context length."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


class CalledFunction(BaseModel):
    """The function a call names and its arguments as JSON text."""

    name: str
    arguments: str


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


ERRORS = {
    400: "bad body or parameters, prompt too long for the context",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model name or route",
    413: "body over --max-body-bytes",
    429: "queue full; retry after the Retry-After seconds",
    503: "the server is shutting down (after SIGTERM); retry on another server or after it restarts",
}
# path -> (method, request body model or None, 200 response model, error statuses, streamed chunk model)
OPERATIONS: dict[str, tuple[str, type[BaseModel] | None, type[BaseModel], tuple[int, ...], type[BaseModel] | None]] = {
    "/health": ("get", None, Health, (), None),
    "/v1/models": ("get", None, ModelList, (401,), None),
    "/v1/models/{name}": ("get", None, ModelCard, (401, 404), None),
    "/v1/chat/completions": ("post", ChatCompletionRequest, ChatCompletion, (400, 401, 404, 413, 429, 503),
                             ChatCompletionChunk),
    "/v1/completions": ("post", CompletionRequest, Completion, (400, 401, 404, 413, 429, 503), CompletionChunk),
    "/v1/responses": ("post", ResponsesRequest, ResponseObject, (400, 401, 404, 413, 429, 503), ResponseStreamEvent),
}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at /openapi.json) describe the real bodies and statuses."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = openapi


def _document(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for operations in spec["paths"].values():  # typed bodies (/tokenize, /detokenize) get FastAPI's 422 listed
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": ref(ErrorResponse)}}
    for path, (method, request, reply, statuses, chunk) in OPERATIONS.items():
        operation = spec["paths"][path][method]
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        ok = {"application/json": {"schema": ref(reply)}}
        if chunk is not None:  # `stream` true: each SSE event's data is a chunk (or an error), then [DONE]
            data = {"anyOf": [{"const": "[DONE]"}, {"contentMediaType": "application/json",
                                                    "contentSchema": {"anyOf": [ref(chunk), ref(ErrorResponse)]}}]}
            ok["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                  "properties": {"data": data}}}
        responses = {"200": {"description": "OK", "content": ok}}
        responses.update({str(s): {"description": ERRORS[s], "content": error} for s in statuses})
        if path == "/health":
            responses["503"] = {"description": "the scheduler thread is gone",
                                "content": {"application/json": {"schema": ref(Health)}}}
        operation["responses"] = responses
    return spec
