"""The server's OpenAPI document, accurate enough for clients and schema-driven fuzzers (schemathesis).

The /v1 handlers read the raw body themselves (size limit, strict types, OpenAI-style 400s), so FastAPI cannot
see their request models; this module puts them in: each POST's request body is its pydantic model's JSON
schema, every response the server can give is listed with its body, and FastAPI's default 422 (which the
app never sends: schema errors are 400s) is dropped. The response models are the ones the handlers build
their bodies from (`responses.py`, `responses_api.py`, `protocol.ErrorResponse`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from minimind.serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from minimind.serve.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Health,
    ModelCard,
    ModelList,
)
from minimind.serve.responses_api import ResponseObject, ResponsesRequest, ResponseStreamEvent

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
