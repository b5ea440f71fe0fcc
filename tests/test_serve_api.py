"""The real `minimind serve` process driven by the official openai client (and httpx for malformed requests).

One server (tiny random model, API key set) serves every test of this module.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from serve_helpers import free_port, running_server, sse_events

from minimind.infer import Engine

pytestmark = pytest.mark.slow  # one server start (imports torch + transformers) is ~10 s here

KEY = "test-key-123"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    args = ["serve", "--model", str(model_dir), "--port", str(port), "--api-key", KEY, "--log-level", "warning"]
    with running_server(args, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir)


def chat_prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def post(server, path, body, key=KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(f"{server}{path}", content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kwargs)


def test_models_list_and_retrieve(client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_dir.name]
    assert models.data[0].object == "model"
    assert client.models.retrieve(model_dir.name).id == model_dir.name


def test_chat_non_streaming_matches_engine_and_tokenizer_counts(client, engine, tokenizer, model_dir):
    reply = client.chat.completions.create(model=model_dir.name, messages=HELLO, max_tokens=8, temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == model_dir.name and reply.created > 0
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    expected = engine.completions([engine.chat_prompt(HELLO)], max_new_tokens=8, temperature=0)[0]
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tokenizer, HELLO)
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_chunks_and_usage(client, tokenizer, model_dir):
    kwargs = dict(model=model_dir.name, messages=HELLO, max_tokens=10, temperature=0.9, seed=1)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.prompt_tokens == chat_prompt_tokens(tokenizer, HELLO)
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])


def test_completions_text_and_stream(client, engine, tokenizer, model_dir):
    prompt = "The capital of France is"
    reply = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    expected = engine.completions([prompt], max_new_tokens=12, temperature=0)[0]
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == 1 + len(tokenizer.encode(prompt, add_special_tokens=False))  # bos
    assert reply.usage.completion_tokens == expected.completion_tokens
    chunks = list(client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    echoed = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expected.text
    by_ids = client.completions.create(model=model_dir.name, prompt=engine.encode(prompt), max_tokens=12,
                                       temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_logprobs_chat_and_completions_streamed_or_not(client, engine, model_dir):
    """logprobs through the openai client: one entry per generated token (the finishing eos left out), the
    engine's raw log-probabilities, top alternatives in order with the sampled token among them when greedy,
    bytes that spell the text; the same entries whole and streamed, chat and text completions alike."""
    expected = engine.completions([engine.chat_prompt(HELLO)], max_new_tokens=12, temperature=0, logprobs=3)[0]
    entries = expected.logprobs[:-1] if expected.token_ids[-1] in engine.eos_ids else expected.logprobs
    kwargs = dict(model=model_dir.name, messages=HELLO, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in entries], abs=1e-6)
    assert b"".join(bytes(c.bytes) for c in content).decode() == reply.choices[0].message.content
    for item, entry in zip(content, entries):
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([lp for _, lp in entry.top], abs=1e-6)
        assert item.top_logprobs[0].token == item.token  # greedy: the sampled token is the most likely
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
    streamed = [c for chunk in client.chat.completions.create(**kwargs, stream=True) for choice in chunk.choices
                if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None}).choices[0].logprobs is None

    text = client.completions.create(model=model_dir.name, prompt="hello", max_tokens=6, temperature=0, logprobs=2)
    legacy = text.choices[0].logprobs
    assert "".join(legacy.tokens).startswith(text.choices[0].text) and len(legacy.tokens) >= 1
    assert legacy.text_offset[0] == 0 and all(len(d) == 2 for d in legacy.top_logprobs)
    assert all(lp == max(d.values()) for lp, d in zip(legacy.token_logprobs, legacy.top_logprobs))
    pieces = [c.choices[0].logprobs for c in client.completions.create(
        model=model_dir.name, prompt="hello", max_tokens=6, temperature=0, logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == legacy.tokens
    assert [o for p in pieces for o in p.text_offset] == legacy.text_offset


def test_echo_with_logprobs_scores_the_prompt(client, engine, model_dir):
    """`echo` + `logprobs` (how lm-eval scores a continuation over the API): the prompt's tokens first, the
    first one unscored, then the generated ones; values equal the engine's; a text prompt's <s> is not listed."""
    ids = engine.encode("The capital of France is")[1:]  # token ids as lm-eval sends them: no <s>
    expected = engine.completions([ids], max_new_tokens=1, temperature=0, prompt_logprobs=1, logprobs=1)[0]
    reply = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                      echo=True)
    legacy = reply.choices[0].logprobs
    assert len(legacy.tokens) == len(ids) + 1 and legacy.token_logprobs[0] is None and legacy.top_logprobs[0] is None
    scored = [e.logprob for e in expected.prompt_logprobs[1:]] + [expected.logprobs[0].logprob]
    assert legacy.token_logprobs[1:] == pytest.approx(scored, abs=1e-5)
    assert reply.choices[0].text.startswith(engine.tokenizer.decode(ids))
    text = client.completions.create(model=model_dir.name, prompt="The capital of France is", max_tokens=1,
                                     temperature=0, logprobs=1, echo=True).choices[0].logprobs
    assert text.tokens[:-1] == legacy.tokens[:-1]  # the prompt's tokens, without the <s> encoding put first
    assert text.token_logprobs[1:-1] != legacy.token_logprobs[1:-1]  # scored after that <s>
    assert text.token_logprobs[0] is not None  # the first text token is predicted from the <s> before it


def test_stop_strings_cut_the_answer(client, model_dir):
    kwargs = dict(model=model_dir.name, prompt="MiniMind is", max_tokens=40, temperature=1.0, seed=7)
    free = client.completions.create(**kwargs).choices[0].text
    assert len(free) >= 6
    stop = free[3:5]
    expected = free[: free.find(stop)]
    for value in (stop, ["never-seen-stop-text", stop]):
        choice = client.completions.create(**kwargs, stop=value).choices[0]
        assert choice.text == expected and choice.finish_reason == "stop"
    streamed = client.completions.create(**kwargs, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_logit_bias_steers_sampling_but_not_logprobs(client, engine, model_dir):
    free = client.completions.create(model=model_dir.name, prompt="hello", max_tokens=6, temperature=0, logprobs=0)
    forced = client.completions.create(model=model_dir.name, prompt="hello", max_tokens=6, temperature=0, logprobs=0,
                                       logit_bias={"42": 100})
    expected = engine.completions([engine.encode("hello")], max_new_tokens=6, logit_bias={42: 100})[0]
    assert forced.choices[0].text == expected.text and expected.token_ids == [42] * 6
    assert forced.choices[0].text != free.choices[0].text
    # the reported log-probabilities are the model's own, as without a bias
    assert forced.choices[0].logprobs.token_logprobs[0] < free.choices[0].logprobs.token_logprobs[0]
    chat_prompt = engine.chat_prompt(HELLO)
    banned = {t: -100 for t in engine.completions([chat_prompt], max_new_tokens=6)[0].token_ids}
    avoided = client.chat.completions.create(model=model_dir.name, messages=HELLO, max_tokens=6, temperature=0,
                                             logit_bias={str(t): b for t, b in banned.items()})
    expected = engine.completions([chat_prompt], max_new_tokens=6, logit_bias=banned)[0]
    assert avoided.choices[0].message.content == expected.text and not set(expected.token_ids) & set(banned)


def test_n_choices_use_seed_plus_index(client, model_dir):
    kwargs = dict(model=model_dir.name, messages=HELLO, max_tokens=8, temperature=1.0)
    reply = client.chat.completions.create(**kwargs, n=3, seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for i, choice in enumerate(reply.choices):
        alone = client.chat.completions.create(**kwargs, seed=11 + i).choices[0]
        assert choice.message.content == alone.message.content
    assert reply.usage.completion_tokens == sum(
        client.chat.completions.create(**kwargs, seed=11 + i).usage.completion_tokens for i in range(3))
    texts = {}
    for chunk in client.chat.completions.create(**kwargs, n=3, seed=11, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert [texts[i] for i in range(3)] == [c.message.content for c in reply.choices]


def test_content_parts_extra_fields_and_user_are_accepted(server, client, model_dir):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    body = {"model": model_dir.name, "max_tokens": 5, "temperature": 0, "user": "u-1", "some_future_field": {"x": 1}}
    a = post(server, "/v1/chat/completions", {**body, "messages": parts})
    b = post(server, "/v1/chat/completions", {**body, "messages": HELLO})
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # b may find a's prompt in the prefix cache
    assert [a.json()["usage"][k] for k in counts] == [b.json()["usage"][k] for k in counts]


CHAT = "/v1/chat/completions"
GOOD = {"messages": HELLO, "max_tokens": 4}
BAD_REQUESTS = [
    ("malformed json", CHAT, b'{"messages": [', 400, None),
    ("not an object", CHAT, b"[1, 2]", 400, None),
    ("NaN", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ("missing messages", CHAT, {"max_tokens": 4}, 400, "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("messages not a list", CHAT, {"messages": "hello"}, 400, "messages"),
    ("wrong role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("missing content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("non-string content", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("temperature < 0", CHAT, {**GOOD, "temperature": -0.1}, 400, "temperature"),
    ("temperature > 2", CHAT, {**GOOD, "temperature": 2.5}, 400, "temperature"),
    ("temperature as text", CHAT, {**GOOD, "temperature": "0.5"}, 400, "temperature"),
    ("top_p 0", CHAT, {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top_p > 1", CHAT, {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("max_tokens 0", CHAT, {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_completion_tokens 0", CHAT, {**GOOD, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("n 0", CHAT, {**GOOD, "n": 0}, 400, "n"),
    ("n too large", CHAT, {**GOOD, "n": 1000}, 400, "n"),
    ("stop not text", CHAT, {**GOOD, "stop": 5}, 400, "stop"),
    ("penalty out of range", CHAT, {**GOOD, "presence_penalty": 3}, 400, "presence_penalty"),
    ("prompt + max_tokens over context", CHAT, {**GOOD, "max_tokens": 10_000}, 400, "max_tokens"),
    ("prompt over context", CHAT, {"messages": [{"role": "user", "content": "MiniMind 42 " * 400}]}, 400,
     "messages"),
    ("stream_options without stream", CHAT, {**GOOD, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("top_logprobs without logprobs", CHAT, {**GOOD, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs too many", CHAT, {**GOOD, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("logprobs not a bool", CHAT, {**GOOD, "logprobs": 3}, 400, "logprobs"),
    ("logprobs too many", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("unknown model", CHAT, {**GOOD, "model": "gpt-4o"}, 404, "model"),
    ("model as a path", CHAT, {**GOOD, "model": "/etc"}, 404, "model"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token id outside vocab", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("completion max_tokens over context", "/v1/completions", {"prompt": "hi", "max_tokens": 300}, 400,
     "max_tokens"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_invalid_requests_get_openai_errors(server, name, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if "context" in name:
        assert error["code"] == "context_length_exceeded"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_body_too_large_auth_and_unknown_route(server):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    response = post(server, CHAT, huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    for key in (None, "wrong-key"):
        response = post(server, CHAT, GOOD, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}
                         ).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # load balancers probe without a key
    response = httpx.get(f"{server}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and "error" in response.json()
    assert post(server, CHAT, GOOD).status_code == 200


def test_openai_client_raises_typed_errors(client, model_dir):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_dir.name, messages=HELLO, temperature=3)
    bad_key = openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_sixteen_concurrent_streams_equal_each_alone(server, model_dir):
    prompts = [f"MiniMind {i} plus {i} equals" for i in range(16)]
    headers = {"Authorization": f"Bearer {KEY}"}

    def body(i: int, stream: bool) -> dict:
        # even: greedy; odd: seeded sampling (the random tiny model's greedy chat answer is one repeated token)
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "seed": i}
        return {"model": model_dir.name, "messages": [{"role": "user", "content": prompts[i]}],
                "max_tokens": 16 + i, "stream": stream, **sampling}

    alone = [post(server, CHAT, body(i, False)).json()["choices"][0]["message"]["content"] for i in range(16)]
    assert len(set(alone)) > 8

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, list[str]]:
        async with http.stream("POST", f"{server}{CHAT}", json=body(i, True), headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            payloads = [p async for p in _async_sse(response)]
        chunks = [json.loads(p) for p in payloads[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        return text, payloads

    async def all_at_once():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(16)))

    results = asyncio.run(all_at_once())
    for (text, payloads), expected in zip(results, alone):
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert text == expected


async def _async_sse(response: httpx.Response):
    async for line in response.aiter_lines():
        for payload in sse_events([line]):
            yield payload
