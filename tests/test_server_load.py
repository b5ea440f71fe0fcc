"""The real `minimind serve` process under fuzzing, load and attack.

One server (tiny random model, API key set, default host) serves the module:
- schemathesis generates valid and invalid requests from the server's own /openapi.json: no 5xx, every
  status and body as documented (SSE chunks are checked against the documented chunk schema here, since
  schemathesis does not look inside event data);
- 200 requests from 32 concurrent clients all succeed; RSS after 500 requests is within 10% of after 50;
- it listens on 127.0.0.1 only; the `model` field never reaches the filesystem.
"""

from __future__ import annotations

import collections
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema_rs
import pytest
import schemathesis
import schemathesis.specs.openapi.checks as openapi_checks
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from serve_helpers import free_port, running_server, sse_events

pytestmark = pytest.mark.slow  # one server start (~10 s) plus a few thousand requests

KEY = "load-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [not_a_server_error, openapi_checks.status_code_conformance, openapi_checks.content_type_conformance,
          openapi_checks.response_schema_conformance, openapi_checks.response_headers_conformance]
# (path, method, positive examples, negative examples); an operation without inputs has one possible
# request and nothing to break, and a free-form path parameter has no invalid value
OPERATIONS = [("/health", "GET", 1, 0), ("/v1/models", "GET", 1, 0), ("/v1/models/{name}", "GET", 50, 0),
              ("/v1/chat/completions", "POST", 150, 100), ("/v1/completions", "POST", 150, 100),
              ("/tokenize", "POST", 100, 100), ("/detokenize", "POST", 100, 100), ("/version", "GET", 1, 0),
              ("/metrics", "GET", 1, 0), ("/v1/responses", "POST", 100, 60)]
CHUNKS = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "CompletionChunk",
          "/v1/responses": "ResponseStreamEvent"}
# read whole streams (schemathesis stops after 20 events by default; a completion here has up to ~260)
CONFIG = schemathesis.Config.from_dict({"max-stream-events": 10_000})


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    args = ["serve", "--model", str(model_dir), "--port", str(port), "--api-key", KEY, "--log-level", "warning"]
    with running_server(args, f"http://127.0.0.1:{port}/health") as proc:
        yield f"http://127.0.0.1:{port}", proc, port


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(f"{server[0]}/openapi.json").json()


def chunk_validator(spec: dict, name: str):
    """A validator for one component of the served document (its $refs resolve inside the document)."""
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": spec["components"]})


def check_stream(response, spec: dict, path: str) -> None:
    """An SSE body: every event a documented chunk (or an in-band error), ending with [DONE] (the Responses API's
    with its final `response.completed` or `response.incomplete` event)."""
    if not any(value.startswith("text/event-stream") for value in response.headers.get("content-type", [])):
        return
    chunk, error = chunk_validator(spec, CHUNKS[path]), chunk_validator(spec, "ErrorResponse")
    events = list(sse_events(response.text.splitlines()))
    if path == "/v1/responses":
        assert events and json.loads(events[-1])["type"] in ("response.completed", "response.incomplete")
        events.append("[DONE]")
    assert events and events[-1] == "[DONE]", response.text[-300:]
    for data in events[:-1]:
        payload = json.loads(data)
        assert "error" not in payload and payload.get("type") != "error", data  # a failure mid-stream
        chunk.validate(payload)
        assert not error.is_valid(payload)


def fuzz(operation, mode: str, examples: int, url: str, spec: dict, path: str) -> collections.Counter:
    """Run `examples` schemathesis cases of `mode` against the server; -> count of each status seen."""
    seen: collections.Counter = collections.Counter()

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def run(case) -> None:
        response = case.call_and_validate(base_url=url, headers=AUTH, checks=CHECKS, timeout=60)
        if path in CHUNKS and response.status_code == 200:
            check_stream(response, spec, path)
        seen[response.status_code] += 1

    run()
    return seen


@pytest.mark.parametrize("path,method,positive,negative", OPERATIONS, ids=[f"{m} {p}" for p, m, *_ in OPERATIONS])
def test_schemathesis_finds_no_server_error_or_schema_violation(server, openapi, path, method, positive, negative):
    url = server[0]
    operation = schemathesis.openapi.from_dict(openapi, config=CONFIG)[path][method]
    valid = fuzz(operation, "positive", positive, url, openapi, path)
    invalid = fuzz(operation, "negative", negative, url, openapi, path) if negative else collections.Counter()
    print(f"{method} {path}: valid-schema cases {dict(valid)}, invalid-schema cases {dict(invalid)}")
    assert not any(status >= 500 for status in valid | invalid)
    if negative:
        assert valid[200] > 0 and set(invalid) == {400}  # both sides were exercised; every invalid body is a 400
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_unauthenticated_requests_are_refused_as_documented(server, openapi):
    url = server[0]
    schema = schemathesis.openapi.from_dict(openapi, config=CONFIG)
    operation = schema["/v1/chat/completions"]["POST"]

    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case) -> None:
        response = case.call_and_validate(base_url=url, headers={"Authorization": "Bearer wrong"}, checks=CHECKS)
        assert response.status_code == 401

    run()


def chat(client: httpx.Client, i: int, stream: bool) -> str:
    """One small chat request; returns its answer (raises on any error)."""
    body = {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 4, "temperature": 0.8,
            "seed": i, "stream": stream}
    if not stream:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        return reply["choices"][0]["message"]["content"]
    text = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        events = list(sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        text.append(json.loads(data)["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def hammer(url: str, requests: int, clients: int, offset: int = 0) -> list[str]:
    """`requests` chat requests spread over `clients` concurrent clients (own connection each); every other
    request streams. Any failure raises."""
    pool = [httpx.Client(base_url=url, headers=AUTH, timeout=120) for _ in range(clients)]
    try:
        with ThreadPoolExecutor(clients) as executor:
            jobs = [executor.submit(chat, pool[i % clients], offset + i, i % 2 == 1) for i in range(requests)]
            return [job.result() for job in jobs]
    finally:
        for client in pool:
            client.close()


def test_200_requests_from_32_concurrent_clients_all_succeed(server):
    start = time.monotonic()
    answers = hammer(server[0], 200, 32)
    print(f"200 requests, 32 clients: {time.monotonic() - start:.1f} s")
    assert len(answers) == 200
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok", "active": 0}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_after_500_requests_is_within_10_percent_of_after_50(server):
    url, proc, _ = server
    hammer(url, 50, 16, offset=1000)
    after_50 = rss_kib(proc.pid)
    for block in range(9):
        hammer(url, 50, 16, offset=2000 + 50 * block)
    after_500 = rss_kib(proc.pid)
    print(f"RSS after 50 requests: {after_50} KiB, after 500: {after_500} KiB")
    assert after_500 <= after_50 * 1.10


def listening_sockets(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                found.append(address)
    return found


def test_binds_loopback_only_by_default(server):
    assert listening_sockets(server[2]) == ["0100007F"]  # 127.0.0.1, little-endian hex; no 0.0.0.0 or ::


def test_model_field_never_loads_a_path(server, model_dir, tmp_path):
    url, proc, _ = server
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for item in model_dir.iterdir():
        (decoy / item.name).write_bytes(item.read_bytes())
    names = [str(decoy), str(model_dir), f"../{model_dir.name}", f"{model_dir.name}/..", "../../../etc/passwd",
             "..", "/", "~", f"file://{decoy}", f"{model_dir.name}\x00"]
    for name in names:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            response = httpx.post(f"{url}{path}", json={**body, "model": name, "max_tokens": 2}, headers=AUTH)
            assert response.status_code == 404, (name, response.text)
            assert response.json()["error"]["code"] == "model_not_found"
        if ".." not in name and "\x00" not in name:  # a client normalises dot segments away before sending
            response = httpx.get(f"{url}/v1/models/{name.lstrip('/')}", headers=AUTH)
            assert response.status_code == 404, name
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]] == [model_dir.name]
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert str(decoy) not in maps  # the decoy's weights were never mapped into the server
