"""The OpenAI-compatible HTTP API (FastAPI) over a `Scheduler`.

    GET  /health                 {"status": "ok", "active": <sequences in flight>} (503 if the scheduler
                                 thread is gone); never needs the key
    GET  /v1/models              the served model name(s)
    GET  /v1/models/{name}
    POST /v1/chat/completions    messages -> chat.completion, or SSE chat.completion.chunk ... [DONE]
    POST /v1/completions         prompt(s) -> text_completion, or SSE text_completion chunks ... [DONE]
    POST /v1/responses           OpenAI's Responses API over the chat path (`serve/responses_api.py`)
    POST /tokenize, /detokenize  vLLM's token tools; GET /version; GET /metrics (Prometheus): `serve/operator.py`,
                                 `serve/metrics.py`

`BodyLimit` (`serve/operator.py`) reads each POST body first (413 over `max_body_bytes`, 400 unless a JSON
object); FastAPI validates it against the handler's typed body (`protocol.py`, `responses_api.py`), and a
validation error becomes the 400 naming its field (`protocol.request_error`). Request handlers run on the event
loop: they check what the types cannot (`check_supported`), tokenize the prompt with the scheduler's `PromptEncoder`, check it fits the context, and submit one `Job` per choice. The scheduler
thread hands outputs back with `loop.call_soon_threadsafe` into an asyncio queue. A streaming response
relays them as SSE chunks; if the client disconnects, Starlette cancels the response's generator and its
`finally` cancels the jobs (their KV-cache rows are freed before the next step). A non-streaming handler
races the result against the client's disconnect message and cancels the jobs the same way.

Errors are OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`: 400 bad body or parameters
(schema errors too, as OpenAI and vLLM answer them, not FastAPI's 422), 401 missing/wrong API key, 404
unknown model or route, 405 wrong method, 413 body over `max_body_bytes`, 429 queue full (with Retry-After),
503 shutting down. A request still generating after `request_timeout` seconds ends with finish_reason "length"
(with what it has); on SIGTERM uvicorn stops accepting connections, a request that still arrives gets 503, and a
stream still running at the shutdown deadline ends with an error event (code "server_shutting_down") and `[DONE]`.
The `model` field only selects among the served names; nothing in a request can make the server load a path.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimind.errors import UserError
from minimind.infer.engine import StepOutput
from minimind.infer.sampling import SamplingParams
from minimind.serve.jobs import Choices, EventStream, Readers, collect_or_leave, shutting_down
from minimind.serve.logprobs import LogprobFormatter, TextOffsets
from minimind.serve.metrics import ServerMetrics
from minimind.serve.openapi import GENERATION_ERRORS, documented, error_responses, install_openapi
from minimind.serve.operator import REQUEST_ID, BodyLimit, RequestLog, add_cors, request_id, token_router
from minimind.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    base_params,
    fit_to_context,
    request_error,
)
from minimind.serve.reasoning import ReasoningSplitter
from minimind.serve.responses import (
    ChatCompletion,
    Completion,
    Health,
    ModelCard,
    ModelList,
    Reply,
    sse,
    usage,
)
from minimind.serve.responses_api import ResponseObject, ResponsesRequest, create_response
from minimind.serve.scheduler import Scheduler, ShuttingDown
from minimind.serve.tools import ToolCallReader
from minimind.tokenizer.thinking import PromptThinking, prompt_ids_thinking

log = logging.getLogger("minimind.serve")


@dataclass
class ServeConfig:
    """What the app serves and how it guards itself."""

    model_names: list[str]  # the first is the default when a request names none
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    sampling_defaults: dict = field(default_factory=dict)  # the model's generation_config.json defaults
    split_reasoning: bool = False  # --reasoning-parser think: chat thinking goes in reasoning_content
    request_timeout: float = 0.0  # seconds a request may generate before it ends with "length" (0 = no limit)
    cors_origins: list[str] = field(default_factory=list)  # --cors-origins: browser origins allowed ("*" = any)
    metrics_auth: bool = False  # --metrics-auth: /metrics needs the API key too


def create_app(scheduler: Scheduler, config: ServeConfig) -> FastAPI:
    """The FastAPI app; starts the scheduler thread on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="MiniMind OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    api = _Api(scheduler, config)
    metrics = ServerMetrics(scheduler, config.model_names[0])

    @app.get("/health", responses={200: {"model": Health, "description": "OK"},
                                   503: {"model": Health, "description": "the scheduler thread is gone"}})
    async def health() -> JSONResponse:
        alive = scheduler.alive
        health = Health(status="ok" if alive else "error", active=scheduler.active)
        return JSONResponse(health.model_dump(), status_code=200 if alive else 503)

    router = APIRouter(prefix="/v1", dependencies=[Depends(api.authorize)])
    router.add_api_route("/models", api.list_models, methods=["GET"], responses=error_responses(401))
    router.add_api_route("/models/{name:path}", api.get_model, methods=["GET"], responses=error_responses(401, 404))
    router.add_api_route("/chat/completions", api.chat_completions, methods=["POST"],
                         responses=documented(ChatCompletion, *GENERATION_ERRORS))
    router.add_api_route("/completions", api.completions, methods=["POST"],
                         responses=documented(Completion, *GENERATION_ERRORS))
    router.add_api_route("/responses", api.responses, methods=["POST"],
                         responses=documented(ResponseObject, *GENERATION_ERRORS))
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)  # inside CORS and the request log
    _add_operator_endpoints(app, api, metrics)
    install_openapi(app)
    return app


def _add_operator_endpoints(app: FastAPI, api: _Api, metrics: ServerMetrics) -> None:
    """/tokenize, /detokenize, /version, /metrics; CORS; request ids, the access log and HTTP counts."""
    app.include_router(token_router(api.prompts, api._model_name, api.authorize))
    guard = [Depends(api.authorize)] if api.config.metrics_auth else []
    app.add_api_route("/metrics", metrics.response, methods=["GET"], dependencies=guard,
                      response_class=PlainTextResponse)
    if api.config.cors_origins:
        add_cors(app, api.config.cors_origins)
    app.add_middleware(RequestLog, metrics=metrics)  # added last: outermost, so every response gets its id


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        """A typed body FastAPI refused: 400 naming the first field at fault, as `parse_request` does."""
        first = err.errors()[0]
        if first["type"] == "json_invalid":  # `BodyLimit` answers first; kept for an app without it
            return JSONResponse(APIError(400, "the request body is not valid JSON", None, "invalid_json").body(),
                                status_code=400)
        return JSONResponse(request_error(err.errors()).body(), status_code=400)

    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=err)
        body = APIError(500, "internal server error", kind="server_error").body()
        rid = request_id(request.scope)  # this handler answers outside RequestLog: add its header here
        return JSONResponse(body, status_code=500, headers={REQUEST_ID: rid} if rid else None)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


class _Api:
    """The /v1 handlers, bound to one scheduler and config."""

    def __init__(self, scheduler: Scheduler, config: ServeConfig):
        self.scheduler = scheduler
        self.config = config
        self.prompts = scheduler.prompts
        self.logprob_format = LogprobFormatter(self.prompts.tokenizer)
        self.eos_ids = frozenset(scheduler.engine.eos_ids)
        self.created = int(time.time())
        self._key = config.api_key.encode() if config.api_key else None

    async def authorize(self, request: Request) -> None:
        """401 unless `Authorization: Bearer <key>` matches (constant-time compare); no-op without a key."""
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self._key):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def _model_card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created, max_model_len=self.prompts.max_seq_len)

    async def list_models(self) -> ModelList:
        return ModelList(data=[self._model_card(n) for n in self.config.model_names])

    async def get_model(self, name: str) -> ModelCard:
        return self._model_card(self._model_name(name))

    def _model_name(self, name: str | None) -> str:
        if name is None:
            return self.config.model_names[0]
        if name not in self.config.model_names:
            served = ", ".join(self.config.model_names)
            raise APIError(404, f"the model {name!r} does not exist; this server serves: {served}", "model",
                           "model_not_found")
        return name

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        model = self._model_name(body.model)
        prompt, reader, splitter = self.chat_job(body, self.config.split_reasoning)
        return await self._generate(request, model, body, [prompt], echoes=None, tools=reader, reasoning=splitter)

    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        return await create_response(self, body, request)

    def chat_job(self, body: ChatCompletionRequest,
                 split_reasoning: bool) -> tuple[list[int], ToolCallReader | None, ReasoningSplitter | None]:
        """A checked chat request -> (prompt ids, the reader of its function calls, the splitter of its thinking
        when `split_reasoning`); shared by /v1/chat/completions and /v1/responses."""
        tools = body.template_tools()
        if tools and not self.prompts.renders_tools:
            raise APIError(400, "this model's chat template does not show tools to the model (it predates "
                           "function calling); retrain or re-save its tokenizer with this version", "tools")
        extra = body.chat_template_kwargs or {}
        try:
            prompt = self.prompts.chat_prompt(body.conversation(), tools=tools, **extra)
        except TemplateError as err:
            raise APIError(400, f"the chat template rejected these messages: {err}", "messages") from None
        except (TypeError, ValueError, LookupError, AttributeError) as err:  # a kwarg's value the template cannot use
            if not extra:
                raise
            raise APIError(400, f"the chat template cannot render with these chat_template_kwargs: {err}",
                           "chat_template_kwargs") from None
        reader = None
        if body.calls_tools:
            reader = ToolCallReader(body.n, body.function_names, body.parallel_tool_calls is not False)
        splitter = None
        if split_reasoning:
            thinking = prompt_ids_thinking(self.prompts.tokenizer, prompt)
            if body.output_grammar() is not None:  # the grammar shapes the reply from its first token: all content
                thinking = PromptThinking.CLOSED
            splitter = ReasoningSplitter(body.n, thinking)
        return prompt, reader, splitter

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        model = self._model_name(body.model)
        try:
            prompts = [self.prompts.encode(p) for p in body.prompt]
        except UserError as err:
            raise APIError(400, str(err), "prompt") from None
        echoes = None
        if body.echo:
            echoes = [p if isinstance(p, str) else self.prompts.tokenizer.decode(p) for p in body.prompt]
        # where each echoed text begins in its ids: after the <s> that encoding a text prompt puts first
        bos = self.prompts.tokenizer.bos_token_id
        starts = [int(isinstance(p, str) and bos is not None and ids[:1] == [bos]) for p, ids in zip(body.prompt, prompts)]
        return await self._generate(request, model, body, prompts, echoes, starts)

    def submit(self, body: ChatCompletionRequest | CompletionRequest,
               prompts: list[list[int]]) -> tuple[SamplingParams, Choices, int]:
        """Check every choice (n per prompt) fits the context and submit one job each; -> (the request's sampling
        parameters, its choices, the prompt tokens of all prompts)."""
        params = base_params(body, self.config.sampling_defaults, self.prompts.vocab_size)
        defaults = self.config.sampling_defaults
        jobs_params = [
            fit_to_context(params, body, defaults, len(ids), self.prompts.max_seq_len, p * body.n + j)
            for p, ids in enumerate(prompts) for j in range(body.n)
        ]
        if len(jobs_params) > self.scheduler.capacity:
            raise APIError(400, f"{len(jobs_params)} choices were asked for (prompts x n); this server takes at "
                           f"most {self.scheduler.capacity} at once", "n")
        prompt_tokens = sum(len(ids) for ids in prompts)
        timeout = self.config.request_timeout
        deadline = time.monotonic() + timeout if timeout > 0 else None
        choices = Choices(self.scheduler, [prompts[i // body.n] for i in range(len(jobs_params))], jobs_params,
                           deadline)
        return params, choices, prompt_tokens

    async def _generate(self, request: Request, model: str, body: ChatCompletionRequest | CompletionRequest,
                        prompts: list[list[int]], echoes: list[str] | None, starts: list[int] | None = None,
                        tools: ToolCallReader | None = None, reasoning: ReasoningSplitter | None = None) -> Response:
        """Check every choice fits the context, submit one job per choice, and answer (streaming or not).
        `starts`: per prompt, the first token of the echoed text (for the prompt's logprobs); `tools`: reads
        each chat choice's reply for function calls; `reasoning`: splits its thinking off."""
        params, choices, prompt_tokens = self.submit(body, prompts)
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        reply = Reply(model, chat=isinstance(body, ChatCompletionRequest), include_usage=include_usage)
        logprobs = None
        if params.logprobs is not None:
            echoed = [job.prompt_ids[(starts or [0] * len(prompts))[i // body.n] :]
                      for i, job in enumerate(choices.jobs)]
            # chat content ends before the eos that finishes it; a text completion lists every sampled token
            # (one entry per position: lm-evaluation-harness finds the continuation's tokens by position)
            ending = self.eos_ids if reply.chat and not params.ignore_eos else frozenset()
            logprobs = _ChoiceLogprobs(self.logprob_format, reply.chat, echoed, ending)
        readers = Readers(tools, reasoning)
        if body.stream:
            return EventStream(_stream(reply, choices, prompt_tokens, echoes, body.n, logprobs, readers), choices)
        return await _respond(request, reply, choices, prompt_tokens, echoes, body.n, logprobs, readers)


class _ChoiceLogprobs:
    """Each choice's token log-probabilities not yet sent, formatted for the chunk (or body) that carries them."""

    def __init__(self, formatter: LogprobFormatter, chat: bool, echoed: list[list[int]], ending: frozenset[int]):
        """`echoed`: per choice, the prompt tokens its echoed text holds (the last ones of its prompt); `ending`:
        tokens left out when they finish a choice."""
        self.formatter, self.chat, self.echoed, self.ending = formatter, chat, echoed, ending
        self.pending: list[list] = [[] for _ in echoed]  # (token id, TokenLogprob or None) pairs
        self.offsets = [TextOffsets() for _ in echoed]  # text completions: where the next token starts

    def add(self, index: int, out: StepOutput) -> None:
        if out.prompt_logprobs is not None:  # echo: the prompt's tokens come first (a leading one unscored)
            echoed = self.echoed[index]
            self.pending[index] += list(zip(echoed, out.prompt_logprobs[len(out.prompt_logprobs) - len(echoed) :]))
        entries = out.logprobs or []
        if out.finished and entries and entries[-1].token_id in self.ending:
            entries = entries[:-1]
        self.pending[index] += [(entry.token_id, entry) for entry in entries]

    def take(self, index: int, even_empty: bool = False) -> dict | None:
        entries, self.pending[index] = self.pending[index], []
        if not entries and not even_empty:
            return None
        if self.chat:
            return self.formatter.chat([entry for _, entry in entries])
        return self.formatter.completion(entries, self.offsets[index])


async def _stream(reply: Reply, choices: Choices, prompt_tokens: int, echoes: list[str] | None,
                  n: int, logprobs: _ChoiceLogprobs | None, readers: Readers) -> AsyncIterator[str]:
    """SSE chunks: opening chunk per choice (chat role, or the echoed prompt), deltas, finish, usage, [DONE].
    With tools, a choice's text stops at the first sign of a call; the calls go out when it finishes."""
    completion_tokens = 0
    try:
        for index in range(len(choices.jobs)):
            if reply.chat:
                yield reply.chunk(index, role=True)
            elif echoes is not None:
                yield reply.chunk(index, echoes[index // n])
        async for index, out in choices.events():
            if logprobs is not None:
                logprobs.add(index, out)
            thinking, text = readers.feed(index, out.text, out.finished)
            if text or thinking:
                yield reply.chunk(index, text or None, reasoning=thinking or None,
                                  logprobs=logprobs and logprobs.take(index))
            if out.finished:
                completion_tokens += out.completion_tokens
                reason = out.finish_reason
                if readers.tools is not None:
                    rest, calls = readers.tools.finish(index)
                    if rest:
                        yield reply.chunk(index, rest)
                    if calls:
                        yield reply.chunk(index, tool_calls=calls)
                        reason = "tool_calls"
                yield reply.chunk(index, finish_reason=reason, logprobs=logprobs and logprobs.take(index))
        if reply.include_usage:
            yield reply.usage_chunk(usage(prompt_tokens, completion_tokens, choices.cached_tokens(n)))
        yield sse("[DONE]")
    except ShuttingDown:  # SIGTERM's deadline passed: a final event the client can act on, then [DONE]
        yield sse(shutting_down().body())
        yield sse("[DONE]")
    except Exception as err:  # headers are sent: report in-band, as OpenAI does
        log.exception("generation failed mid-stream", exc_info=err)
        yield sse(APIError(500, "generation failed: internal server error", kind="server_error").body())
        yield sse("[DONE]")


async def _respond(request: Request, reply: Reply, choices: Choices, prompt_tokens: int,
                   echoes: list[str] | None, n: int, logprobs: _ChoiceLogprobs | None,
                   readers: Readers) -> Response:
    """Wait for every choice, or stop early (and release them) when the client disconnects."""
    texts = [[echoes[i // n]] if echoes is not None else [] for i in range(len(choices.jobs))]
    reasons: list[str] = [""] * len(choices.jobs)
    completion_tokens = 0

    async def collect() -> None:
        nonlocal completion_tokens
        async for index, out in choices.events():
            texts[index].append(out.text)
            if logprobs is not None:
                logprobs.add(index, out)
            if out.finished:
                reasons[index] = out.finish_reason
                completion_tokens += out.completion_tokens

    if not await collect_or_leave(request, choices, collect()):
        return Response(status_code=499)  # nobody is listening; the status is for the access log
    per_choice = [logprobs.take(i, even_empty=True) for i in range(len(texts))] if logprobs is not None else None
    parts = [readers.whole("".join(t)) for t in texts]
    reasons = ["tool_calls" if calls else reason for reason, (_, _, calls) in zip(reasons, parts)]
    tokens = usage(prompt_tokens, completion_tokens, choices.cached_tokens(n))
    return JSONResponse(reply.body([content for _, content, _ in parts], reasons, tokens,
                                   per_choice, [calls for _, _, calls in parts],
                                   [thinking for thinking, _, _ in parts] if readers.reasoning else None))
