"""What the server's OpenAPI document needs beyond what FastAPI writes from the routes.

FastAPI generates the document: each POST's request body from the pydantic model its handler takes
(`protocol.py`, `responses_api.py`, `operator.py`), and each route's responses from the `responses=` it declares
with `documented` / `error_responses` here (the 200 body's model from `responses.py` or `responses_api.py`, the
error body `protocol.ErrorResponse`). `install_openapi` adds the one thing a type cannot say: a streaming
route's 200 is also `text/event-stream`, each event's data a chunk model (or an in-band error), then [DONE];
and it drops FastAPI's 422, which this server never sends (schema errors are answered 400).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from minimind.serve.protocol import ErrorResponse
from minimind.serve.responses import ChatCompletionChunk, CompletionChunk
from minimind.serve.responses_api import ResponseStreamEvent

ERRORS = {
    400: "bad body or parameters, prompt too long for the context",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model name or route",
    413: "body over --max-body-bytes",
    429: "queue full; retry after the Retry-After seconds",
    503: "the server is shutting down (after SIGTERM); retry on another server or after it restarts",
}
# what a generation route can answer besides 200
GENERATION_ERRORS = (400, 401, 404, 413, 429, 503)
# path -> the model of each SSE event's data when the request sets `stream`
STREAMS: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionChunk,
                                       "/v1/completions": CompletionChunk, "/v1/responses": ResponseStreamEvent}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` entries for these error statuses: OpenAI's error body, what each means."""
    return {status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses}


def documented(ok: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: its 200 body's model and its error statuses."""
    return {200: {"model": ok, "description": "OK"}, **error_responses(*statuses)}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at /openapi.json) FastAPI's document plus the SSE bodies, less the 422s."""

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
    for operations in spec["paths"].values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)

    def ref(model: type[BaseModel]) -> dict[str, str]:
        # serialization mode, as FastAPI writes response models: the definitions they share come out the same
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, definition in schema.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components.setdefault(model.__name__, schema)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    for path, chunk in STREAMS.items():
        data = {"anyOf": [{"const": "[DONE]"}, {"contentMediaType": "application/json",
                                                "contentSchema": {"anyOf": [ref(chunk), ref(ErrorResponse)]}}]}
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                   "properties": {"data": data}}}
    return spec
