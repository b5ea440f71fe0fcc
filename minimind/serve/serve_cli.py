"""`minimind serve`: an OpenAI-compatible API server for one model directory (FastAPI + uvicorn).

    minimind serve --model runs/sft                      # http://127.0.0.1:8998/v1, model name "sft"
    minimind serve --model runs/sft --api-key secret --port 9000 --max-batch-size 16

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="secret")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "你好"}], stream=True)

Binds 127.0.0.1 unless told otherwise (and warns when bound elsewhere without an API key). The key may also
come from $MINIMIND_API_KEY (keeps it out of `ps`). --cors-origins lets browser pages from those origins call
the API; /metrics (Prometheus) is open unless --metrics-auth; every response has an x-request-id.
Concurrent requests share decode steps (continuous batching, up to --max-batch-size at once); up to
--max-queue more wait, and beyond that the server answers 429. Endpoints and error codes: see
`minimind.serve.app`; sampling defaults and request fields: `minimind.serve.protocol`.

A request still generating after --request-timeout seconds ends with finish_reason "length". SIGTERM (or
Ctrl-C) stops taking connections and answers new requests 503; running requests get --shutdown-timeout
seconds to finish, then each open stream ends with an error event and `[DONE]`, and the process exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
import sys
from pathlib import Path

from minimind.errors import UserError, install_hint
from minimind.infer.options import add_model_arguments, generation_defaults, load_engine


def tcp_port(text: str) -> int:
    """`--port`'s type: 0 to 65535 (the socket layer would take a larger number modulo 65536)."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 0 to 65535, got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=tcp_port, default=8998, help="TCP port (0: any free one)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1; if not given, $MINIMIND_API_KEY; "
                        "neither = no key")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="name(s) clients use in 'model' (default: the model directory's name)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; beyond that the server answers 429")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    parser.add_argument("--reasoning-parser", default="none", choices=["none", "think"],
                        help="think: a chat reply's <think>...</think> goes in reasoning_content, the answer in "
                        "content (as DeepSeek's API and vLLM answer); none: the reply as generated")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may generate; past it the reply ends with finish_reason "
                        "'length' and what it has (0 = no limit)")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="on SIGTERM/Ctrl-C: seconds running requests get to finish; then open streams end "
                        "with a 'server_shutting_down' error event and [DONE] and the server exits")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="uvicorn's log level (info logs every request, with its x-request-id)")
    parser.add_argument("--cors-origins", default=None, metavar="ORIGIN[,ORIGIN]",
                        help="browser origins allowed to call the API, comma-separated (e.g. "
                        "http://localhost:3000; * = any); default: none (no CORS headers)")
    parser.add_argument("--metrics-auth", action="store_true",
                        help="/metrics needs the API key too (default: open, like /health)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from minimind.serve.app import ServeConfig, create_app
        from minimind.serve.operator import uvicorn_log_config
        from minimind.serve.scheduler import Scheduler
    except ImportError as err:
        raise UserError(f"minimind serve needs the serve extra ({err.name} is missing): {install_hint('serve')}") from None
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1024)):
        if value < low:
            raise UserError(f"{flag} is {value}; expected at least {low}")
    for flag, value in (("--request-timeout", args.request_timeout), ("--shutdown-timeout", args.shutdown_timeout)):
        if not value >= 0:  # (NaN too)
            raise UserError(f"{flag} is {value}; expected a number of seconds, 0 or more")
    # A Hub id is the model's name (as vLLM serves it), not its snapshot folder's commit hash.
    names = args.served_model_name or [getattr(args, "hub_sources", {}).get("model") or Path(args.model).resolve().name]
    if len(set(names)) != len(names) or not all(name.strip() for name in names):
        raise UserError(f"--served-model-name {' '.join(names)!r}: expected distinct, non-empty names")
    origins = cors_origins(args.cors_origins)
    _check_port_free(args.host, args.port)
    defaults = generation_defaults(args.model)
    engine = load_engine(args, batches=True, max_batch_size=args.max_batch_size)
    config = ServeConfig(names, args.api_key or os.environ.get("MINIMIND_API_KEY") or None, args.max_body_bytes,
                         defaults, split_reasoning=args.reasoning_parser == "think",
                         request_timeout=args.request_timeout, cors_origins=origins,
                         metrics_auth=args.metrics_auth)
    scheduler = Scheduler(engine, max_queue=args.max_queue)
    app = create_app(scheduler, config)
    key_note = "API key required" if config.api_key else "no API key"
    print(f"minimind serve: {args.model} as {', '.join(names)} on http://{args.host}:{args.port}/v1 "
          f"({engine.device}, {key_note})", flush=True)
    if config.api_key is None and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this address can use "
              "the model; set --api-key or $MINIMIND_API_KEY", file=sys.stderr, flush=True)
    _draining_server(uvicorn, scheduler, args.shutdown_timeout)(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, log_config=uvicorn_log_config(args.log_level),
        access_log=False,  # the app writes its own access lines, with the request id (`serve/operator.py`)
        # uvicorn's own limit only backs ours up: by then every stream has had its final event
        timeout_graceful_shutdown=int(args.shutdown_timeout) + 3)).run()
    return 0


def _draining_server(uvicorn, scheduler, grace: float):
    """uvicorn's Server class, made to drain the scheduler when SIGTERM/SIGINT arrives (before uvicorn waits for
    open connections, which the drain ends within `grace` seconds)."""

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.drain(grace)
            super().handle_exit(sig, frame)

    return DrainingServer


def cors_origins(value: str | None) -> list[str]:
    """--cors-origins "http://a.example,https://b.example:8443" -> the origins; each is * or scheme://host[:port]."""
    origins = [origin.strip().rstrip("/") for origin in (value or "").split(",") if origin.strip()]
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise UserError(f"--cors-origins: {origin!r} is not an origin; expected * or scheme://host[:port] "
                            "such as http://localhost:3000")
    return origins


def _is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before loading the model if the address cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host!r} is not an address this machine can bind ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror})") from None
