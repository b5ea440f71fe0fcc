"""The server's operator endpoints and comforts, in-process through FastAPI's TestClient: /tokenize,
/detokenize, /version, /metrics (Prometheus), x-request-id and the access log, CORS, --served-model-name aliases,
and the warning for an exposed server without a key."""

from __future__ import annotations

import json
import logging

import pytest
import uvicorn
from conftest import tiny_model
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from thinking_helpers import with_thinking_template

import minimind
from minimind.cli import main
from minimind.infer import Engine
from minimind.infer.sampling import SamplingParams
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.metrics import ServerMetrics
from minimind.serve.scheduler import Job, Scheduler

KEY = "operator-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT = "hello world, 你好"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def make_client(tokenizer, **config) -> TestClient:
    engine = Engine(tiny_model(), tokenizer, max_batch_size=4)
    return TestClient(create_app(Scheduler(engine), ServeConfig(**{"model_names": ["tiny"], "api_key": KEY,
                                                                   **config})))


@pytest.fixture
def client(tokenizer):
    with make_client(tokenizer, model_names=["tiny", "tiny-alias"]) as client:  # lifespan: the scheduler runs
        yield client


def metrics(client: TestClient, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def sample(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_tokenize_a_prompt_as_the_tokenizer_and_completions_count_it(client, tokenizer):
    own = tokenizer.encode(TEXT, add_special_tokens=False)
    body = client.post("/tokenize", headers=AUTH, json={"prompt": TEXT, "return_token_strs": True}).json()
    assert body == {"count": len(own) + 1, "max_model_len": 256, "tokens": [tokenizer.bos_token_id, *own],
                    "token_strs": tokenizer.convert_ids_to_tokens([tokenizer.bos_token_id, *own])}
    bare = client.post("/tokenize", headers=AUTH, json={"prompt": TEXT, "add_special_tokens": False,
                                                        "model": "tiny-alias"}).json()
    assert bare == {"count": len(own), "max_model_len": 256, "tokens": own}  # no token_strs unless asked
    reply = client.post("/v1/completions", headers=AUTH, json={"prompt": TEXT, "max_tokens": 1}).json()
    assert reply["usage"]["prompt_tokens"] == body["count"]  # what a completion feeds the model
    for ids in (own, body["tokens"]):
        back = client.post("/detokenize", headers=AUTH, json={"tokens": ids})
        assert back.status_code == 200 and back.json() == {"prompt": tokenizer.decode(ids)}
    assert client.post("/detokenize", headers=AUTH, json={"tokens": own}).json()["prompt"] == TEXT


def test_tokenize_messages_with_the_chat_template(client, tokenizer):
    for generation_prompt in (True, False):
        text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
        own = tokenizer.encode(text, add_special_tokens=False)
        body = client.post("/tokenize", headers=AUTH,
                           json={"messages": CHAT, "add_generation_prompt": generation_prompt}).json()
        assert body == {"count": len(own), "max_model_len": 256, "tokens": own}
        assert client.post("/detokenize", headers=AUTH, json={"tokens": own}).json() == {"prompt": text}
    default = client.post("/tokenize", headers=AUTH, json={"messages": CHAT}).json()
    reply = client.post("/v1/chat/completions", headers=AUTH, json={"messages": CHAT, "max_tokens": 1}).json()
    assert default["count"] == reply["usage"]["prompt_tokens"]  # the generation prompt is on by default


def test_tokenize_passes_chat_template_kwargs_as_a_chat_request_does(tokenizer):
    switched = with_thinking_template(tokenizer)
    with make_client(switched) as client:
        for on in (True, False):
            kwargs = {"open_thinking": on}
            text = switched.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, **kwargs)
            body = client.post("/tokenize", headers=AUTH, json={"messages": CHAT, "chat_template_kwargs": kwargs})
            assert body.json()["tokens"] == switched.encode(text, add_special_tokens=False)
            assert text.endswith("<think>\n" if on else "</think>\n\n")
            reply = client.post("/v1/chat/completions", headers=AUTH,
                                json={"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": kwargs}).json()
            assert reply["usage"]["prompt_tokens"] == body.json()["count"]
        for kwargs, status in (({"messages": []}, 400), ({"note": 5}, 400), ("on", 400)):
            response = client.post("/tokenize", headers=AUTH, json={"messages": CHAT, "chat_template_kwargs": kwargs})
            assert response.status_code == status and response.json()["error"]["param"] == "chat_template_kwargs"


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 512]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
])
def test_token_tools_refuse_bad_bodies_naming_the_field(client, path, body, status, param):
    response = client.post(path, headers=AUTH, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and error["message"] and error["type"] == "invalid_request_error"


def test_token_tools_need_the_key_version_does_not(client):
    assert client.post("/tokenize", json={"prompt": "a"}).status_code == 401
    assert client.post("/detokenize", json={"tokens": [1]}).status_code == 401
    assert client.get("/version").json() == {"version": minimind.__version__}


def test_metrics_move_with_requests_and_hold_no_request_text(client):
    before = metrics(client)
    secret = "a secret prompt 12345"
    chat = client.post("/v1/chat/completions", headers=AUTH,
                       json={"messages": [{"role": "user", "content": secret}], "max_tokens": 3, "n": 2,
                             "ignore_eos": True}).json()
    text = client.post("/v1/completions", headers=AUTH, json={"prompt": secret, "max_tokens": 2,
                                                               "ignore_eos": True}).json()
    assert client.get(f"/v1/models/{secret}", headers=AUTH).status_code == 404
    assert client.get(f"/nowhere/{secret}").status_code == 404
    after = metrics(client)
    model = {"model_name": "tiny"}

    def grew(name: str, **labels) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    # a request of n choices counts each choice's prompt once per choice (each is its own sequence)
    assert grew("minimind:prompt_tokens_total", **model) == chat["usage"]["prompt_tokens"] * 2 + \
        text["usage"]["prompt_tokens"]
    assert grew("minimind:generation_tokens_total", **model) == 3 * 2 + 2
    assert grew("minimind:request_success_total", finished_reason="length", **model) == 3
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        assert grew(f"minimind:{histogram}_count", **model) == 3, histogram
        assert grew(f"minimind:{histogram}_bucket", le="+Inf", **model) == 3
    assert grew("minimind:http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("minimind:http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert grew("minimind:http_requests_total", endpoint="/v1/models/{name}", status="404") == 1
    assert grew("minimind:http_requests_total", endpoint="other", status="404") == 1
    assert grew("minimind:http_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert sample(after, "minimind:num_requests_running", **model) == 0
    assert sample(after, "minimind:num_requests_waiting", **model) == 0
    assert not [key for key in after if any("secret" in value for _, value in key[1])]


def test_running_waiting_and_kv_rows_follow_the_scheduler(tokenizer):
    scheduler = Scheduler(Engine(tiny_model(), tokenizer, max_batch_size=2))  # never started: stepped here
    registry = ServerMetrics(scheduler, "tiny").registry

    def gauges() -> tuple[float, float, float]:
        return tuple(registry.get_sample_value(f"minimind:{name}", {"model_name": "tiny"})
                     for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))

    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    jobs = [Job([1, 5, 6], params, lambda event: None) for _ in range(3)]
    scheduler.submit(jobs)
    assert gauges() == (0, 3, 0)
    scheduler._serve_once()  # adds the three, prefills two (the rows there are)
    assert gauges() == (2, 1, 1.0)
    scheduler.cancel(jobs[:2])
    scheduler._serve_once()  # frees both rows, prefills the third
    assert gauges() == (1, 0, 0.5)


def test_metrics_are_open_unless_metrics_auth(tokenizer):
    with make_client(tokenizer) as client:
        assert client.get("/metrics").status_code == 200
    with make_client(tokenizer, metrics_auth=True) as client:
        assert client.get("/metrics").status_code == 401
        assert metrics(client, AUTH)


class Lines(logging.Handler):
    """Collects a logger's messages (caplog's root handler misses them once `minimind serve` has configured
    logging in this process: the server's loggers do not propagate)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines():
    logger = logging.getLogger("minimind.serve.access")
    handler, level = Lines(), logger.level
    logger.setLevel(logging.INFO)  # (setLevel, not the attribute: it clears the logger's cache)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_every_response_has_a_request_id_in_the_header_and_the_access_log(client, access_lines):
    mine = client.get("/v1/models", headers={**AUTH, "x-request-id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    generated = {client.get("/v1/models").headers["x-request-id"],  # a 401
                 client.get("/health").headers["x-request-id"],
                 client.post("/v1/chat/completions", headers={**AUTH, "x-request-id": "has space"},
                             json={"messages": CHAT, "max_tokens": 1}).headers["x-request-id"]}
    assert len(generated) == 3 and all(len(rid) == 32 and int(rid, 16) >= 0 for rid in generated)
    with client.stream("POST", "/v1/completions", headers={**AUTH, "x-request-id": "stream-1"},
                       json={"prompt": "a", "max_tokens": 2, "stream": True}) as stream:
        assert stream.headers["x-request-id"] == "stream-1"
        assert list(stream.iter_lines())[-2:] == ["data: [DONE]", ""]
    client.get(f"/v1/models?api_key={KEY}", headers={"x-request-id": "with-query"})
    lines = access_lines
    assert any('"GET /v1/models HTTP/1.1" 200' in line and line.endswith("request_id=trace-42") for line in lines)
    assert any('"POST /v1/completions HTTP/1.1" 200' in line and "request_id=stream-1" in line for line in lines)
    assert all(rid in "\n".join(lines) for rid in generated)
    assert not [line for line in lines if KEY in line]  # the query string is never logged


def test_cors_only_for_the_configured_origins(tokenizer):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with make_client(tokenizer, cors_origins=["http://app.example", "https://b.example:8443"]) as client:
        response = client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        refused = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        simple = client.get("/v1/models", headers={**AUTH, "Origin": "https://b.example:8443"})
        assert simple.headers["access-control-allow-origin"] == "https://b.example:8443"
        assert "x-request-id" in simple.headers["access-control-expose-headers"]
    with make_client(tokenizer) as client:  # no --cors-origins: no CORS headers at all
        assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=preflight).headers


def test_served_model_name_aliases_are_listed_and_each_accepted(client):
    listed = client.get("/v1/models", headers=AUTH).json()["data"]
    assert [card["id"] for card in listed] == ["tiny", "tiny-alias"]
    for name in ("tiny", "tiny-alias"):
        assert client.get(f"/v1/models/{name}", headers=AUTH).json()["id"] == name
        reply = client.post("/v1/chat/completions", headers=AUTH,
                            json={"model": name, "messages": CHAT, "max_tokens": 1})
        assert reply.status_code == 200 and reply.json()["model"] == name
    assert client.post("/v1/completions", headers=AUTH, json={"model": "tiny-other", "prompt": "a"}).status_code == 404


def serve(monkeypatch, *args: str):
    """Run `minimind serve` up to the point uvicorn would start; -> the app it would serve."""
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config.app))
    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    assert main(["serve", "--port", "0", "--log-level", "warning", *args]) == 0
    return started[0]


def test_serve_flags_aliases_cors_metrics_auth_and_the_exposed_host_warning(model_dir, monkeypatch, capsys):
    app = serve(monkeypatch, "--model", str(model_dir), "--host", "0.0.0.0", "--served-model-name", "a", "b",
                "--cors-origins", "http://app.example, http://localhost:3000")
    assert "warning: listening on 0.0.0.0 without an API key" in capsys.readouterr().err
    with TestClient(app) as client:
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["a", "b"]
        allowed = client.get("/health", headers={"Origin": "http://localhost:3000"})
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    app = serve(monkeypatch, "--model", str(model_dir), "--host", "0.0.0.0", "--api-key", KEY, "--metrics-auth")
    assert "warning" not in capsys.readouterr().err
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401 and client.get("/metrics", headers=AUTH).status_code == 200
    serve(monkeypatch, "--model", str(model_dir), "--host", "127.0.0.1")
    assert "warning" not in capsys.readouterr().err
    for bad in (["--cors-origins", "app.example"], ["--served-model-name", "a", "a"]):
        assert main(["serve", "--model", str(model_dir), "--port", "0", *bad]) == 2
        assert bad[0] in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # not bound modulo 65536 to another port
        main(["serve", "--model", str(model_dir), "--port", "99999"])
    assert exit_.value.code == 2 and "expected a TCP port from 0 to 65535, got 99999" in capsys.readouterr().err


def test_openapi_documents_the_new_endpoints(client):
    spec = client.get("/openapi.json").json()
    for path in ("/tokenize", "/detokenize"):
        operation = spec["paths"][path]["post"]
        assert set(operation["responses"]) == {"200", "400", "401", "404", "413"}, path
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("Request")
    tokenize = spec["components"]["schemas"]["TokenizeRequest"]["properties"]
    assert {"prompt", "messages", "add_generation_prompt", "add_special_tokens", "return_token_strs"} <= set(tokenize)
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "/version" in spec["paths"] and "422" not in str(spec["paths"])


def test_a_server_error_still_carries_the_request_id(tokenizer, monkeypatch):
    scheduler = Scheduler(Engine(tiny_model(), tokenizer, max_batch_size=2))

    def broken(ids):
        raise RuntimeError("a bug")

    monkeypatch.setattr(scheduler.prompts.tokenizer, "convert_ids_to_tokens", broken)
    app = create_app(scheduler, ServeConfig(["tiny"]))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/tokenize", json={"prompt": "a", "return_token_strs": True},
                               headers={"x-request-id": "bug-1"})
        assert response.status_code == 500 and response.headers["x-request-id"] == "bug-1"
        assert response.json()["error"]["type"] == "server_error"
        assert sample(metrics(client), "minimind:http_requests_total", endpoint="/tokenize", status="500") == 1


def test_the_body_limit_guards_every_post_and_any_content_type_is_read_as_json(tokenizer):
    with make_client(tokenizer, max_body_bytes=300) as client:
        body = json.dumps({"messages": CHAT, "max_tokens": 1}).encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded"):  # as `curl -d` sends it
            assert client.post("/v1/chat/completions", headers={**AUTH, "Content-Type": kind},
                               content=body).status_code == 200, kind
        declared = client.post("/tokenize", headers=AUTH, json={"prompt": "x" * 400})
        counted = client.post("/tokenize", headers=AUTH, content=iter([b'{"prompt": "', b"x" * 400, b'"}']))
        for response in (declared, counted):  # Content-Length over the limit, or none and the bytes counted
            error = response.json()["error"]
            assert response.status_code == 413 and error["code"] == "request_too_large", response.text
        assert declared.json()["error"]["message"].endswith("bytes; the limit is 300")
        assert counted.json()["error"]["message"].endswith("over the limit of 300 bytes")  # nothing declared it
        for bad in (b'{"prompt": NaN}', b"[1]", b""):
            response = client.post("/detokenize", headers=AUTH, content=bad)
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", bad
