"""Constrained decoding: a random tiny model, which on its own writes noise, gives JSON valid under a schema and
function calls valid under their parameters, through the Engine and through the server with the openai SDK."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest
import torch
from conftest import tiny_model
from fastapi.testclient import TestClient

from minimind.errors import UserError
from minimind.infer import Engine
from minimind.infer.grammar import json_grammar, tool_call_grammar
from minimind.infer.sampling import SamplingParams
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.scheduler import Scheduler

# Bounded (lengths, ranges, no extra keys) so that even a random model finishes well within max_new_tokens.
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "days", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}}, "required": ["tz"],
        "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(tiny_model(), tokenizer, max_batch_size=8)


def test_outputs_follow_the_schema_sampled_or_greedy_batched_with_free_rows(engine):
    free = engine.completions(["hello"], max_new_tokens=30, temperature=1.0, seed=0)[0].text
    with pytest.raises(ValueError):
        json.loads(free)  # the model alone writes no JSON
    grammar = json_grammar(CITY)
    prompts = ["hello", "The weather", "x", "天气"]
    guided = engine.completions(prompts, max_new_tokens=80, temperature=1.0, seed=1, grammar=grammar)
    greedy = engine.completions(prompts[:2], max_new_tokens=80, grammar=grammar, repetition_penalty=1.3)
    greedy += engine.completions(prompts[:1], max_new_tokens=80, grammar=grammar, ignore_eos=True)  # ends anyway
    for result in guided + greedy:
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), CITY)
        assert result.text == json.dumps(json.loads(result.text), ensure_ascii=False)  # json.dumps's layout
    # a free request batched with guided ones is not constrained by them
    mixed = [engine.add("hello", max_new_tokens=30, temperature=1.0, seed=0),
             engine.add("hello", max_new_tokens=80, temperature=1.0, seed=1, grammar=grammar)]
    texts = {i: "" for i in mixed}
    while engine.has_work:
        for out in engine.step():
            texts[out.request_id] += out.text
    assert texts[mixed[0]] == free and json.loads(texts[mixed[1]])


def test_logprobs_stay_the_models_own(engine):
    grammar = json_grammar(TIME)
    (result,) = engine.completions(["hello"], max_new_tokens=40, grammar=grammar, logprobs=2)
    ids = engine.encode("hello") + result.token_ids[:-1]
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0, -len(result.token_ids):]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([e.logprob for e in result.logprobs]), expected, atol=1e-4)


def test_function_calls_parse_and_fit_their_parameters(engine):
    grammar = tool_call_grammar({"get_weather": CITY, "get_time": TIME})
    names = []
    for seed in range(1, 4):
        (result,) = engine.completions(["call"], max_new_tokens=200, temperature=1.0, seed=seed, grammar=grammar)
        assert result.finish_reason == "stop"  # the grammar completed; nothing was cut short
        blocks = result.text.split("\n")  # the reply is only calls: "<tool_call>", JSON, "</tool_call>", ...
        assert len(blocks) >= 3 and len(blocks) % 3 == 0, result.text
        for opening, body, closing in zip(blocks[::3], blocks[1::3], blocks[2::3]):
            assert (opening, closing) == ("<tool_call>", "</tool_call>"), result.text
            call = json.loads(body)
            assert set(call) == {"name", "arguments"}
            jsonschema.validate(call["arguments"], {"get_weather": CITY, "get_time": TIME}[call["name"]])
            names.append(call["name"])
    assert set(names) == {"get_weather", "get_time"}  # each function's schema was exercised


def test_bad_grammars_are_refused_in_one_line():
    with pytest.raises(UserError, match="the output grammar is invalid: .*nope"):
        SamplingParams(grammar=json_grammar({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    with pytest.raises(UserError, match="expected an llguidance grammar string"):
        SamplingParams(grammar={"type": "object"})


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    days: int = pydantic.Field(ge=1, le=7)


@pytest.fixture(scope="module")
def client(tokenizer):
    app = create_app(Scheduler(Engine(tiny_model(max_seq_len=1024), tokenizer, max_batch_size=4)), ServeConfig(["tiny"]))
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.slow
def test_openai_sdk_structured_outputs(client):
    parsed = client.chat.completions.parse(model="tiny", messages=HELLO, response_format=Forecast, temperature=1.0,
                                           seed=3, max_tokens=100)
    forecast = parsed.choices[0].message.parsed
    assert isinstance(forecast, Forecast) and 1 <= forecast.days <= 7
    whole = client.chat.completions.create(model="tiny", messages=HELLO, response_format={"type": "json_object"},
                                           temperature=0, max_tokens=200)
    chunks = client.chat.completions.create(model="tiny", messages=HELLO, response_format={"type": "json_object"},
                                            temperature=0, max_tokens=200, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # any object: this random model keeps writing one key's digits until max_tokens, but writes nothing else
    content = whole.choices[0].message.content
    assert content.startswith('{"') and '": ' in content and streamed == content


@pytest.mark.slow
def test_required_and_named_tool_choice_always_call(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
             {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        reply = client.chat.completions.create(model="tiny", messages=HELLO, tools=tools, tool_choice=choice,
                                               temperature=1.0, seed=5, max_tokens=200, parallel_tool_calls=False)
        (call,) = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), CITY if call.function.name == "get_weather" else TIME)
    refused = client.with_raw_response.chat.completions.create
    with pytest.raises(openai.BadRequestError, match="leaves no room for tool calls"):
        refused(model="tiny", messages=HELLO, tools=tools, response_format={"type": "json_object"})


@pytest.mark.slow
def test_vllm_guided_fields_on_both_endpoints(client):
    import re

    pattern = r"[0-9]{3}-[a-z]{2}"
    for seed in range(3):
        text = client.completions.create(model="tiny", prompt="code:", max_tokens=20, temperature=1.0, seed=seed,
                                         extra_body={"guided_regex": pattern}).choices[0].text
        assert re.fullmatch(pattern, text), text
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0, seed=1,
                                           extra_body={"guided_choice": ["是", "否", "not sure"]})
    assert reply.choices[0].message.content in ("是", "否", "not sure") and reply.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="x", max_tokens=100, temperature=1.0, seed=2,
                                       stream=True, extra_body={"guided_json": CITY})
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in chunks)), CITY)
    with pytest.raises(openai.BadRequestError, match="each constrain the output"):
        client.completions.create(model="tiny", prompt="x", extra_body={"guided_regex": "a", "guided_choice": ["b"]})


def test_extreme_sampling_values_never_sample_a_forbidden_token(engine):
    # a repetition penalty that underflows to 0 in float32 once turned forbidden (-inf) logits into NaN
    grammar = json_grammar(TIME)
    for extreme in ({"repetition_penalty": 5e-324}, {"temperature": 1e-38}, {"presence_penalty": -2.0},
                    {"frequency_penalty": 2.0, "repetition_penalty": 10.0}, {"logit_bias": {1: 100, 2: 100}}):
        (result,) = engine.completions(["hello"], max_new_tokens=60, seed=0, grammar=grammar,
                                       **{"temperature": 1.0, **extreme})
        jsonschema.validate(json.loads(result.text), TIME)
