"""The API server's guards, in-process (fast): the constant-time key check, the `model` field that can only
name a served model, the OpenAPI document, and a server that refuses to start on a bad model directory."""

from __future__ import annotations

import ast
import inspect
import json
import shutil

import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient

import minimind.serve.app as app_module
from minimind.cli import main
from minimind.infer import Engine
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.scheduler import Scheduler

KEY = "s3cret-key"
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def client(tokenizer):
    app = create_app(Scheduler(Engine(tiny_model(), tokenizer, max_batch_size=4)), ServeConfig(["tiny"], KEY))
    with TestClient(app) as client:  # runs the lifespan: the scheduler thread starts and stops
        yield client


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_is_compared_with_hmac_compare_digest_only():
    source = inspect.getsource(app_module._Api.authorize)
    tree = ast.parse(source.strip())
    compares = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    key_compares = [node for node in compares if "_key" in ast.unparse(node) or "token" in ast.unparse(node)]
    assert [ast.unparse(node) for node in key_compares] == ["self._key is None"]  # never `token == key`
    assert "hmac.compare_digest(" in source


def test_every_key_check_goes_through_compare_digest(client, monkeypatch):
    calls = []
    real = app_module.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    for key, status in ((KEY, 200), ("wrong", 401), (KEY[:-1], 401), (KEY + "x", 401), ("", 401),
                        (KEY.upper(), 401)):
        assert client.get("/v1/models", headers=bearer(key)).status_code == status, key
    assert calls == [(k.encode(), KEY.encode()) for k in (KEY, "wrong", KEY[:-1], KEY + "x", KEY.upper())]
    non_ascii = {"Authorization": b"Bearer " + "\u00e9".encode() * 4}  # headers arrive as latin-1 text
    assert client.get("/v1/models", headers=non_ascii).status_code == 401
    assert len(calls) == 6 and calls[-1][1] == KEY.encode()


@pytest.mark.parametrize("headers", [{}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                                     {"X-API-Key": KEY}, {"Authorization": "Bearer"}])
def test_a_key_anywhere_but_the_bearer_header_is_refused(client, headers):
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", HI)):
        response = client.request(method, path, headers=headers, json=body)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert client.get(f"/v1/models?api_key={KEY}").status_code == 401
    assert client.get("/health").status_code == 200  # health never needs the key


def test_model_field_selects_only_served_names_and_never_loads(client, model_dir, monkeypatch):
    import minimind.modeldir as hub

    loads = []
    for target, name in ((hub, "load_model"), (hub, "load_model_dir"), (Engine, "from_pretrained")):
        monkeypatch.setattr(target, name, lambda *a, _name=name, **k: loads.append(_name))
    for name in (str(model_dir), model_dir.name, "../" + model_dir.name, "/etc/passwd", "..", "tiny/../tiny",
                 " tiny", "TINY", f"file://{model_dir}"):
        response = client.post("/v1/chat/completions", headers=bearer(KEY), json={**HI, "model": name})
        assert response.status_code == 404 and response.json()["error"]["param"] == "model", name
    assert client.post("/v1/chat/completions", headers=bearer(KEY), json={**HI, "model": "tiny"}).status_code == 200
    assert loads == []


def test_openapi_documents_bodies_and_statuses(client):
    spec = client.get("/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "429", "503"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    request = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert request["required"] == ["messages"] and request["properties"]["n"]["maximum"] == 16
    messages = request["properties"]["messages"]["items"]  # one model per role, chosen by "role"
    schemas = spec["components"]["schemas"]
    turns = {role: schemas[ref.rsplit("/", 1)[1]] for role, ref in messages["discriminator"]["mapping"].items()}
    assert messages["discriminator"]["propertyName"] == "role" and len(messages["oneOf"]) == 5
    assert set(turns) == {"system", "developer", "user", "assistant", "tool"}
    user, assistant = turns["user"], turns["assistant"]
    assert {"type": "string"} in user["properties"]["content"]["anyOf"] and "content" in user["required"]
    assert "tool_calls" not in user["properties"]  # refused on every turn but the assistant's
    assert {"type": "null"} in assistant["properties"]["content"]["anyOf"] and "tool_calls" in assistant["properties"]
    parts = next(form for form in user["properties"]["content"]["anyOf"] if form.get("type") == "array")
    assert schemas[parts["items"]["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"] == "text"
    formats = request["properties"]["response_format"]["anyOf"][0]
    assert formats["discriminator"]["propertyName"] == "type"
    assert set(formats["discriminator"]["mapping"]) == {"text", "json_object", "json_schema"}
    tool = schemas["FunctionSpec"]["properties"]
    assert tool["name"]["pattern"] and "tool_calls" in schemas["AssistantMessage"]["properties"]
    assert "422" not in json.dumps(spec["paths"])  # schema errors are answered 400, as documented


def test_serve_refuses_to_start_on_a_bad_model_dir(model_dir, tmp_path, capsys, monkeypatch):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: started.append(a))  # serve runs a Server
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": "hot"}))
    assert main(["serve", "--model", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "generation_config.json: temperature is 'hot'" in err
    assert started == []
