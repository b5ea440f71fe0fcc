"""Request parsing and the mapping to SamplingParams, without a server."""

from __future__ import annotations

import re

import pytest

from minimind.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    base_params,
    fit_to_context,
    parse_request,
)
from minimind.serve.responses import Reply, usage

HELLO = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_defaults_come_from_the_generation_config_and_requests_override_them():
    defaults = {"temperature": 0.85, "top_p": 0.85, "top_k": 5, "max_new_tokens": 40}
    request = parse_request(ChatCompletionRequest, {"messages": HELLO})
    params = fit_to_context(base_params(request, defaults, 512), request, defaults, 10, 256, 0)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.85, 0.85, 5, 40)
    request = parse_request(ChatCompletionRequest, {"messages": HELLO, "temperature": 0, "top_p": 0.5,
                                                    "top_k": -1, "max_completion_tokens": 7, "stop": "x"})
    params = fit_to_context(base_params(request, defaults, 512), request, defaults, 10, 256, 0)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0, 0.5, 0, 7)
    assert params.stop == ("x",)
    bare = parse_request(CompletionRequest, {"prompt": "a"})
    params = fit_to_context(base_params(bare, {}, 512), bare, {}, 250, 256, 0)
    assert params.temperature == 1.0 and params.max_new_tokens == 6  # OpenAI's default; the rest of the context


def test_seed_per_choice_and_context_checks():
    request = parse_request(CompletionRequest, {"prompt": ["a", "b"], "n": 2, "seed": 100, "max_tokens": 5})
    params = base_params(request, {}, 512)
    assert [fit_to_context(params, request, {}, 3, 256, i).seed for i in range(4)] == [100, 101, 102, 103]
    with pytest.raises(APIError) as err:
        fit_to_context(params, request, {}, 252, 256, 0)
    assert (err.value.status, err.value.param, err.value.code) == (400, "max_tokens", "context_length_exceeded")
    with pytest.raises(APIError) as err:
        fit_to_context(params, request, {}, 256, 256, 0)
    assert err.value.param == "prompt"


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": None}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "c"}]}]},
     "messages[1].tool_calls[0].function"),
    ({"messages": HELLO, "stop": ["a", 1]}, "stop"),
    ({"messages": HELLO, "stop": ["s"] * 17}, "stop"),
    ({"messages": HELLO, "n": True}, "n"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "seed": 2**63}, "seed"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"messages": HELLO, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice"),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": HELLO, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": HELLO, "function_call": "auto"}, "function_call"),
    ({"messages": HELLO, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "properties": {"a": {"$ref": "#/missing"}}}}}}, "response_format"),
    ({"messages": HELLO, "guided_json": {"type": "integer", "maximum": 2**70}}, "guided_json"),  # past 64 bits
])
def test_bad_chat_fields_name_their_param(body, param):
    with pytest.raises(APIError) as err:
        parse_request(ChatCompletionRequest, body)
    assert err.value.status == 400 and err.value.param is not None and err.value.param.startswith(param), err.value.message
    assert err.value.body()["error"]["message"]


def test_prompt_forms_and_content_parts():
    forms = [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])]
    for given, expected in forms:
        assert parse_request(CompletionRequest, {"prompt": given}).prompt == expected
    for bad in ([], [[]], ["a", 1], 5, [True]):
        with pytest.raises(APIError):
            parse_request(CompletionRequest, {"prompt": bad})
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_request(ChatCompletionRequest, {"messages": [{"role": "developer", "content": parts}]})
    assert request.conversation() == [{"role": "system", "content": "ab"}]


def test_reply_shapes():
    reply = Reply("m", chat=True, include_usage=True)
    body = reply.body(["x", "y"], ["stop", "length"], usage(3, 4, cached_tokens=2))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][1] == {"index": 1, "message": {"role": "assistant", "content": "y"}, "logprobs": None,
                                  "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert reply.chunk(0, role=True).startswith("data: {") and reply.chunk(0, "z").endswith("}\n\n")
    text = Reply("m", chat=False)
    assert text.body(["x"], ["stop"], usage(1, 1))["object"] == "text_completion" and text.id.startswith("cmpl-")


def test_serve_flags_fail_in_one_line_before_loading(model_dir, capsys):
    import socket

    from minimind.cli import main

    assert main(["serve", "--model", str(model_dir), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size is 0" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(model_dir), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_text_offsets_count_a_split_character_once(tokenizer):
    from minimind.serve.logprobs import LogprobFormatter, TextOffsets

    text = "龍貓 MiniMind 🦊 ok"  # characters the test tokenizer never saw: one token per byte
    ids = tokenizer.encode(text, add_special_tokens=False)
    formatter = LogprobFormatter(tokenizer)
    pieces = [formatter.token_bytes(i) for i in ids]
    assert b"".join(pieces).decode() == text and any(p.decode("utf-8", "replace") != p.decode("utf-8", "ignore")
                                                       for p in pieces)  # some token splits a character
    offsets = TextOffsets()
    first = formatter.completion([(i, None) for i in ids[:5]], offsets)["text_offset"]
    rest = formatter.completion([(i, None) for i in ids[5:]], offsets)["text_offset"]  # the next chunk
    seen = b""
    for token_bytes, offset in zip(pieces, first + rest):
        assert offset == len(seen.decode("utf-8", "ignore"))  # complete characters before the token
        seen += token_bytes
    assert offsets.chars == len(text)


def test_logit_bias_keys_are_token_ids_of_the_model():
    request = parse_request(CompletionRequest, {"prompt": "a", "logit_bias": {"7": 100, "11": -100.0}})
    assert base_params(request, {}, 512).logit_bias == {7: 100, 11: -100.0}
    for bias, message in (({"512": 1}, "not a token id of this model (0 to 511)"), ({"x": 1}, "not a token id"),
                          ({"-1": 1}, "not a token id"), ({"7": 101}, "expected a number in [-100, 100]"),
                          ({"²": 1}, "not a token id"), ({"٣": 1}, "not a token id")):  # digits to str.isdigit
        request = parse_request(CompletionRequest, {"prompt": "a", "logit_bias": bias})
        with pytest.raises(APIError, match=re.escape(message)) as err:
            base_params(request, {}, 512)
        assert err.value.param == "logit_bias"


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "assistant"}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": [{"type": "text"}]}]}, "messages[0].content"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "system", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
     "response_format.json_schema.name"),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": HELLO, "chat_template_kwargs": {"tools": 1}}, "chat_template_kwargs"),
])
def test_errors_inside_a_role_or_type_union_name_the_field_without_the_tag(body, param):
    with pytest.raises(APIError) as err:
        parse_request(ChatCompletionRequest, body)
    assert (err.value.status, err.value.param) == (400, param) and err.value.message.startswith(param + ": ")


def test_each_role_has_its_model_and_the_template_reads_joined_text():
    request = parse_request(ChatCompletionRequest, {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi", "tool_calls": []},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "18", "tool_call_id": "c1"}]})
    assert [type(m).__name__ for m in request.messages] == ["SystemTurn", "UserTurn", "AssistantTurn", "ToolTurn"]
    assert request.conversation() == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL["function"]}]},
        {"role": "tool", "content": "18"}]


@pytest.mark.parametrize("parameters,problem", [
    ({"type": "nonsense"}, "type 'nonsense' is not one of"),
    ({"type": "object", "properties": {"city": {"type": "text"}}}, "properties.city.type 'text' is not one of"),
    ({"type": "object", "required": "city"}, "required must be a list of property names"),
    ({"type": "array", "items": {"enum": "a"}}, "items.enum must be a list"),
])
def test_a_tool_with_an_invalid_schema_is_refused_whatever_the_tool_choice(parameters, problem):
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    for choice in (None, "auto", "none", "required"):
        body = {"messages": HELLO, "tools": [tool], **({"tool_choice": choice} if choice else {})}
        with pytest.raises(APIError) as err:
            parse_request(ChatCompletionRequest, body)
        assert (err.value.status, err.value.param) == (400, "tools[0].function.parameters")
        assert problem in err.value.message
    fine = {"type": "object", "properties": {"city": {"type": ["string", "null"], "enum": ["a", None]}},
            "required": ["city"]}
    parse_request(ChatCompletionRequest, {"messages": HELLO, "tools": [{**tool, "function": {"name": "f",
                                                                                            "parameters": fine}}]})
