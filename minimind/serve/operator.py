"""What operators expect of a model server besides generation: request ids, an access log, CORS, token tools,
and a limit on request bodies (`BodyLimit`).

    POST /tokenize      {"prompt": "..."} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}
                        (+ "token_strs" with "return_token_strs": true); vLLM's shapes
    POST /detokenize    {"tokens": [...]} -> {"prompt": text}
    GET  /version       {"version": minimind.__version__}; never needs the key

/tokenize counts what a request would feed the model: a `prompt` as /v1/completions encodes it
(`add_special_tokens`, default true, puts <s> in front), `messages` rendered by the chat template as
/v1/chat/completions does (`add_generation_prompt` default true, `add_special_tokens` default false: the template
writes its own; `chat_template_kwargs` as the chat request takes them). Both token tools take the API key when
the server has one, as /v1 does.

Every response carries `x-request-id`: the client's own when it sends a usable one (1-128 visible ASCII
characters), else a new random id; the access log line (`minimind.serve.access`, one per response, written
when the response is done) shows it with the method, path (never the query string), status and seconds. The
same middleware counts responses for `minimind:http_requests_total` (`serve/metrics.py`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI
from jinja2 import TemplateError
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minimind.serve.metrics import ServerMetrics
from minimind.serve.openapi import error_responses
from minimind.serve.protocol import APIError, ChatCompletionRequest, TemplateKwargs, _Body, parse_request
from minimind.serve.protocol import Message as ChatMessage
from minimind.serve.scheduler import PromptEncoder

access_log = logging.getLogger("minimind.serve.access")
REQUEST_ID = "x-request-id"
_USABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe in a header and on one log line


class TokenizeRequest(_Body):
    """POST /tokenize: exactly one of `prompt` (text) and `messages` (a chat, rendered by the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # messages only: end with the assistant's opening, as a chat request does
    # messages only: the chat request's extra template variables, e.g. {"open_thinking": true}
    chat_template_kwargs: TemplateKwargs = None
    add_special_tokens: bool | None = None  # <s> in front; default true for a prompt, false for messages
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """The prompt's token ids, their count and the context length (+ each token's string, when asked)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """The text of the token ids."""

    prompt: str


class Version(BaseModel):
    """GET /version."""

    version: str


def token_router(prompts: PromptEncoder, model_name: Callable[[str | None], str],
                 authorize: Callable[..., Awaitable[None]]) -> APIRouter:
    """/tokenize, /detokenize (behind `authorize`) and /version. `model_name` checks a request's `model`."""
    router = APIRouter()
    tokenizer = prompts.tokenizer

    @router.get("/version")
    async def version() -> Version:
        # the package root's constant: `minimind --version`; the root is imported already (it holds this package),
        # and reading a constant of it does not reach the model or engine names it loads lazily
        return Version(version=sys.modules["minimind"].__version__)

    @router.post("/tokenize", dependencies=[Depends(authorize)], response_model_exclude_none=True,
                 responses=error_responses(400, 401, 404, 413))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt (text) and messages (a chat)",
                           "messages" if body.messages is not None else "prompt")
        if body.messages is not None:
            # the chat endpoint's own checks of the messages and template variables, then its rendering
            chat = parse_request(ChatCompletionRequest, {
                "messages": [m.model_dump(exclude_none=True) for m in body.messages],
                "chat_template_kwargs": body.chat_template_kwargs})
            extra = chat.chat_template_kwargs or {}
            try:
                text = tokenizer.apply_chat_template(chat.conversation(), tokenize=False,
                                                     add_generation_prompt=body.add_generation_prompt, **extra)
            except TemplateError as err:
                raise APIError(400, f"the chat template rejected these messages: {err}", "messages") from None
            except (TypeError, ValueError, LookupError, AttributeError) as err:  # a variable the template cannot use
                if not extra:
                    raise
                raise APIError(400, f"the chat template cannot render with these chat_template_kwargs: {err}",
                               "chat_template_kwargs") from None
            special = bool(body.add_special_tokens)
        else:
            text, special = body.prompt, body.add_special_tokens is not False
        ids = prompts.encode(text) if special else tokenizer.encode(text, add_special_tokens=False)
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=prompts.max_seq_len, tokens=ids, token_strs=strs)

    @router.post("/detokenize", dependencies=[Depends(authorize)], responses=error_responses(400, 401, 404, 413))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        model_name(body.model)
        for i, token in enumerate(body.tokens):
            if not 0 <= token < prompts.vocab_size:
                raise APIError(400, f"tokens[{i}] is {token}; expected a token id in [0, {prompts.vocab_size})",
                               f"tokens[{i}]")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    return router


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Let browser pages from `origins` ("*" = any) call the API; preflight requests are answered here."""
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], expose_headers=[REQUEST_ID], max_age=600)


class BodyLimit:
    """Reads a POST's body before any handler does: 413 past `max_bytes` (as its Content-Length declares it, or as
    counted while it arrives), 400 unless it is a JSON object. Every body the API takes is JSON whatever its
    Content-Type says (a plain `curl -d` works), so the handler is handed the body with Content-Type JSON, then
    the client's later messages (its disconnect) as they come."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        data = bytearray()
        refusal = self._declared_too_large(scope)
        while refusal is None:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody is left to answer
            data += message.get("body", b"")
            if len(data) > self.max_bytes:
                refusal = APIError(413, f"the request body is over the limit of {self.max_bytes} bytes", None,
                                   "request_too_large")
            elif not message.get("more_body", False):
                refusal = _not_a_json_object(data)
                break
        if refusal is not None:
            await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(data), "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        await self.app({**scope, "headers": [*headers, (b"content-type", b"application/json")]}, replay, send)

    def _declared_too_large(self, scope: Scope) -> APIError | None:
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return APIError(413, f"the request body is {declared} bytes; the limit is {self.max_bytes}", None,
                            "request_too_large")
        return None


def _not_a_json_object(data: bytes) -> APIError | None:
    """None when `data` is a JSON object (NaN and Infinity are not JSON); else the 400 saying what it is."""
    try:
        value = json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError) as err:
        return APIError(400, f"the request body is not valid JSON: {err}", None, "invalid_json")
    if not isinstance(value, dict):
        return APIError(400, "the request body must be a JSON object", None, "invalid_json")
    return None


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def request_id(scope: Scope) -> str | None:
    """The id `RequestLog` gave this request (None outside it)."""
    return scope.get("state", {}).get("request_id")


class RequestLog:
    """ASGI middleware: an `x-request-id` on every response, one access log line, the HTTP metrics."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self._endpoints: _Endpoints | None = None  # built on the first request, from the finished app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID.encode(), b"").decode("latin-1")
        rid = given if _USABLE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid  # for the error handlers' own responses
        start, status = time.monotonic(), 500  # an exception before any response: the server answers 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self._endpoints is None:
                self._endpoints = _Endpoints(scope["app"].openapi()["paths"])
            self.metrics.count_http(self._endpoints.label(scope["path"]), status)
            client = scope.get("client")
            access_log.info('%s - "%s %s HTTP/%s" %d %.3fs request_id=%s',
                            f"{client[0]}:{client[1]}" if client else "-", scope["method"], scope["path"],
                            scope.get("http_version", "1.1"), status, time.monotonic() - start, rid)


class _Endpoints:
    """Request path -> the documented path it falls under (e.g. /v1/models/{name}), or "other": a bounded set of
    metric labels that never holds anything a client wrote."""

    def __init__(self, templates: list[str]):
        self.exact = {t for t in templates if "{" not in t}
        self.patterns = [(re.compile("".join(".+" if part.startswith("{") else re.escape(part)
                                             for part in re.split(r"(\{[^}]*\})", t))), t)
                         for t in templates if "{" in t]

    def label(self, path: str) -> str:
        """The template `path` matches (a preflight or a wrong method counts under its endpoint too)."""
        if path in self.exact:
            return path
        return next((t for pattern, t in self.patterns if pattern.fullmatch(path)), "other")


def uvicorn_log_config(level: str) -> dict:
    """uvicorn's logging setup plus the server's own loggers (access lines on stdout, errors on stderr)."""
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG, "handlers": {**LOGGING_CONFIG["handlers"]}, "loggers": {**LOGGING_CONFIG["loggers"]}}
    config["handlers"]["minimind_access"] = {"formatter": "default", "class": "logging.StreamHandler",
                                             "stream": "ext://sys.stdout"}
    config["loggers"]["minimind.serve"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["loggers"]["minimind.serve.access"] = {"handlers": ["minimind_access"], "level": level.upper(),
                                                  "propagate": False}
    return config
