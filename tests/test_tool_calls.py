"""Function calling: the chat template's tools, calls and results; SFT data with them; reading calls back out of
a reply; and the server answering the openai SDK with `tool_calls`, from a tiny model fine-tuned to call."""

from __future__ import annotations

import copy
import json

import openai
import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient
from serve_helpers import finetune

from minimind.data.chat import encode_conversation
from minimind.infer import Engine
from minimind.modeldir import save_model_dir
from minimind.records import read_records, validate_sft
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.scheduler import Scheduler
from minimind.serve.tools import ToolCallReader
from minimind.tokenizer import load_tokenizer
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT
from minimind.tokenizer.tool_calls import ToolCall, parse_tool_calls, renders_tools, safe_text_end

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def call_turn(name: str, arguments: dict, content: str | None = None) -> dict:
    return {"role": "assistant", "content": content,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def weather_chat() -> list[dict]:
    return [{"role": "user", "content": "Weather in Paris?"}, call_turn("get_weather", {"city": "Paris"}),
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
            {"role": "assistant", "content": "18 degrees in Paris."}]


def time_chat() -> list[dict]:
    return [{"role": "user", "content": "Time in Tokyo?"}, call_turn("get_time", {"tz": "Asia/Tokyo"}),
            {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "09:30"}'},
            {"role": "assistant", "content": "It is 09:30 in Tokyo."}]


# ---- the template ----

def test_template_shows_tools_calls_and_results(tokenizer):
    text = tokenizer.apply_chat_template(weather_chat(), tools=TOOLS, tokenize=False)
    system, user, call, result, answer, end = text.split("</s>\n")
    assert system.startswith(f"<s>system\n{DEFAULT_SYSTEM_PROMPT}\n\n# Tools\n")
    for tool in TOOLS:  # each schema on its own line, as JSON
        assert "\n" + json.dumps(tool, ensure_ascii=False) + "\n" in system
    assert user == "<s>user\nWeather in Paris?"
    assert call == "<s>assistant\n" + CALL_TEXT
    assert result == '<s>tool\n{"temp": 18}'
    assert answer == "<s>assistant\n18 degrees in Paris." and end == ""
    # without tools the template renders exactly as before function calling existed
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == (
        f"<s>system\n{DEFAULT_SYSTEM_PROMPT}</s>\n<s>user\nhi</s>\n<s>assistant\nyo</s>\n")


def test_template_reads_minimind_functions_and_several_calls(tokenizer):
    as_kwarg = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, weather_chat()[0]],
                                             tools=[WEATHER["function"]], tokenize=False)
    as_field = tokenizer.apply_chat_template([{"role": "system", "content": "S", "functions": [WEATHER["function"]]},
                                              weather_chat()[0]], tokenize=False)
    assert as_kwarg == as_field and '"name": "get_weather"' in as_kwarg
    as_text = tokenizer.apply_chat_template([{"role": "system", "content": "S", "functions": json.dumps(
        [WEATHER["function"]])}, weather_chat()[0]], tokenize=False)
    assert as_text == as_kwarg.replace(json.dumps(WEATHER["function"]), json.dumps([WEATHER["function"]]))
    turn = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}, {"name": "get_time"}]}
    text = tokenizer.apply_chat_template([weather_chat()[0], turn], tokenize=False)
    assert text.endswith("<s>assistant\nChecking.\n" + CALL_TEXT + '\n<tool_call>\n{"name": "get_time", '
                         '"arguments": {}}\n</tool_call></s>\n')


def test_sft_learns_the_calls_and_the_answer_not_the_results(tokenizer):
    record = validate_sft({"tools": TOOLS, "conversations": weather_chat()})
    ids, mask = encode_conversation(tokenizer, record)
    learned = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == CALL_TEXT + "</s>18 degrees in Paris.</s>"
    assert "get_time" in tokenizer.decode(ids)  # the tools reach the prompt


def test_records_take_openai_and_minimind_forms_and_name_bad_calls(tmp_path):
    minimind_form = {"conversations": [{"role": "system", "content": "S", "functions": [WEATHER["function"]]},
                                       *weather_chat()]}
    assert validate_sft(minimind_form)[0]["functions"] == [WEATHER["function"]]
    as_text = [{"role": "system", "content": "S", key: json.dumps([WEATHER["function"]])} for key in ("functions", "tools")]
    assert all(validate_sft({"conversations": [system, *weather_chat()]})[0]["functions"] == [WEATHER["function"]]
               for system in as_text)  # MiniMind's and HF's tool data keep the list as JSON text
    calls_as_text = weather_chat()
    calls_as_text[1] = {"role": "assistant", "content": "", "tool_calls": json.dumps(calls_as_text[1]["tool_calls"])}
    assert validate_sft({"conversations": calls_as_text})[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    openai_form = validate_sft({"tools": TOOLS, "conversations": weather_chat()})
    assert openai_form[0]["functions"] == TOOLS
    assert openai_form[1 + 0]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                                  "arguments": {"city": "Paris"}}}]
    bad_calls = [
        ("not json", '{"name": "f", "arguments": "{oops"}', "not valid JSON"),
        ("no name", '{"arguments": {}}', 'with a function "name"'),
        ("list args", '{"name": "f", "arguments": [1]}', "must be a JSON object"),
    ]
    for label, call, reason in bad_calls:
        path = tmp_path / f"{label}.jsonl"
        record = {"conversations": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "", "tool_calls": [json.loads(call)]}]}
        path.write_text(json.dumps({"conversations": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]}) + "\n"
                        + json.dumps(record) + "\n")
        with pytest.raises(Exception) as err:
            list(read_records(path, "sft"))
        assert f"{path}:2: conversations[1].tool_calls[0]" in str(err.value) and reason in str(err.value), label
    with pytest.raises(ValueError, match="tools must be a list"):
        validate_sft({"tools": [1], "conversations": weather_chat()})


# ---- reading calls back ----

def test_parse_tool_calls():
    names = {"get_weather", "get_time"}
    assert parse_tool_calls("just text", names) is None
    assert parse_tool_calls(CALL_TEXT, names) == ("", [ToolCall("get_weather", '{"city": "Paris"}')])
    two = "Let me see. " + CALL_TEXT + '\n<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}'
    content, calls = parse_tool_calls(two, names)  # the last call may lack its close (eos came first)
    assert content == "Let me see." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].arguments) == {"tz": "UTC"}
    for broken in (CALL_TEXT.replace("Paris\"}", "Paris\""), CALL_TEXT + " and more", CALL_TEXT[:-30],
                   CALL_TEXT.replace("get_weather", "rm_rf"), "<tool_call>\n[1, 2]\n</tool_call>"):
        assert parse_tool_calls(broken, names) is None, broken
    assert parse_tool_calls(CALL_TEXT.replace("get_weather", "rm_rf"), None) is not None  # no names: any


def test_streaming_holds_back_only_what_may_become_a_call():
    assert safe_text_end("Hello <tool") == len("Hello ")
    assert safe_text_end("Hello <b>") == len("Hello <b>")
    assert safe_text_end("a<tool_call>{") == 1
    reply = "Sure <thing>. " + CALL_TEXT
    whole = ToolCallReader(1, frozenset({"get_weather"}))
    streamed = ToolCallReader(1, frozenset({"get_weather"}))
    sent = "".join(streamed.feed(0, ch) for ch in reply)
    rest, calls = streamed.finish(0)
    content, whole_calls = whole.message(reply)
    assert sent == "Sure <thing>. " and rest == "" and content == "Sure <thing>."
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    # a reply that only looked like a call comes back whole, as text
    fake = ToolCallReader(1, frozenset({"get_weather"}))
    sent = "".join(fake.feed(0, ch) for ch in "x <tool_call> not json")
    assert sent + fake.finish(0)[0] == "x <tool_call> not json" and fake.finish(0)[1] is None


# The chat template versions before function calling saved in tokenizer_config.json.
EARLIER_TEMPLATE = (
    "{%- set show = show_thinking is not defined or show_thinking -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- bos_token + 'system\\n' + messages[0]['content'] + eos_token + '\\n' -}}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{- bos_token + 'system\\n" + DEFAULT_SYSTEM_PROMPT + "' + eos_token + '\\n' -}}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{{- bos_token + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
    " and message['reasoning_content'] and show -%}"
    "{{- '<think>' + message['reasoning_content'] + '</think><answer>' + message['content'] + '</answer>' -}}"
    "{%- else -%}"
    "{{- message['content'] -}}"
    "{%- endif -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- bos_token + 'assistant\\n' -}}{%- endif -%}"
)


def test_tokenizers_saved_with_the_earlier_template_get_tools(tokenizer, tmp_path):
    earlier = copy.deepcopy(tokenizer)
    earlier.chat_template = EARLIER_TEMPLATE
    earlier.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert renders_tools(loaded) and not renders_tools(earlier)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "r"}, {"role": "user", "content": "c"}]
    for generation in (True, False):  # nothing else changes
        for extra in ({}, {"show_thinking": False}):
            assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation, **extra) == \
                earlier.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation, **extra)


def test_a_template_without_tools_is_detected(tokenizer):
    assert renders_tools(tokenizer)
    old = copy.deepcopy(tokenizer)
    old.chat_template = ("{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
    assert not renders_tools(old)
    app = create_app(Scheduler(Engine(tiny_model(), old, max_batch_size=2)), ServeConfig(["old"]))
    with TestClient(app) as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 2}
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "tools"
        assert "does not show tools" in answer.json()["error"]["message"]
        body["tool_choice"] = "none"  # the tools are not needed then
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_parallel_tool_calls_true_returns_every_call_and_false_only_one(tokenizer):
    """A random model made to call (tool_choice "required", bounded argument schemas): with parallel_tool_calls
    true (the default) a reply may hold several calls, each whole and valid; with false, exactly one."""
    import jsonschema

    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
            "additionalProperties": False}
    tz = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 4}}, "required": ["tz"],
          "additionalProperties": False}
    schemas = {"get_weather": city, "get_time": tz}
    tools = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in schemas.items()]
    app = create_app(Scheduler(Engine(tiny_model(max_seq_len=1536), tokenizer, max_batch_size=2)),
                     ServeConfig(["random"]))
    with TestClient(app) as http:
        def calls(seed: int, parallel: bool | None) -> list[dict]:
            body = {"messages": [{"role": "user", "content": "call"}], "tools": tools, "tool_choice": "required",
                    "temperature": 1.0, "seed": seed, "max_tokens": 600}
            if parallel is not None:
                body["parallel_tool_calls"] = parallel
            reply = http.post("/v1/chat/completions", json=body).json()
            assert "choices" in reply, reply
            (choice,) = reply["choices"]
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
            return choice["message"]["tool_calls"]

        several = {seed: calls(seed, True) for seed in range(6)}
        assert any(len(found) > 1 for found in several.values())  # some replies call more than once
        for seed, found in several.items():
            assert [c["function"] for c in calls(seed, None)] == [c["function"] for c in found]  # the default
            assert len({call["id"] for call in found}) == len(found)
            for call in found:
                jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
            assert len(calls(seed, False)) == 1


# ---- the server, with a model that learned to call ----

@pytest.fixture(scope="module")
def caller_dir(tmp_path_factory, tokenizer):
    """The tiny model fine-tuned on two chats that call a tool and one that needs none, until it repeats them."""
    root = tmp_path_factory.mktemp("caller")
    save_model_dir(tiny_model(max_seq_len=1024), tokenizer, root / "init")
    hello = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there."}]
    records = [{"tools": TOOLS, "conversations": weather_chat()}, {"tools": TOOLS, "conversations": time_chat()},
               {"tools": TOOLS, "conversations": hello}]
    return finetune(records, root / "init", root / "sft", steps=120, max_seq_len=1024)


@pytest.fixture(scope="module")
def client(caller_dir):
    app = create_app(Scheduler(Engine.from_pretrained(caller_dir, max_batch_size=4)), ServeConfig(["caller"]))
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="caller", messages=messages, tools=TOOLS, temperature=0, **kwargs)


@pytest.mark.slow
def test_the_openai_sdk_gets_tool_calls_and_the_answer_after_the_result(client):
    question = weather_chat()[:1]
    reply = ask(client, question)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    history = [*question, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}]
    after = ask(client, history)
    assert after.choices[0].message.content == "18 degrees in Paris." and not after.choices[0].message.tool_calls
    assert after.choices[0].finish_reason == "stop"
    plain = ask(client, [{"role": "user", "content": "hello"}])  # tools offered, none needed
    assert plain.choices[0].message.content == "Hi there." and plain.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_streamed_calls_arrive_whole_and_no_tag_leaks_into_content(client):
    chunks = list(ask(client, time_chat()[:1], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert content == "" and [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    (delta,) = deltas
    assert delta.index == 0 and delta.function.name == "get_time"
    assert json.loads(delta.function.arguments) == {"tz": "Asia/Tokyo"}
    whole = ask(client, time_chat()[:1]).choices[0].message.tool_calls[0].function
    assert (whole.name, whole.arguments) == (delta.function.name, delta.function.arguments)
    # several choices, with logprobs: each choice's call and finish arrive under its own index
    chunks = list(ask(client, time_chat()[:1], stream=True, n=2, logprobs=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        (call,) = [d for c in mine for d in (c.delta.tool_calls or [])]
        assert call.function.name == "get_time" and mine[-1].finish_reason == "tool_calls"
        assert sum(len(c.logprobs.content) for c in mine if c.logprobs) > 10  # every token's, text held or not


@pytest.mark.slow
def test_tool_choice_required_named_and_none(client, tokenizer):
    question = weather_chat()[:1]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        (call,) = ask(client, question, tool_choice=choice).choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    unused = ask(client, question, tool_choice="none", max_tokens=8)
    assert unused.choices[0].message.tool_calls is None and unused.choices[0].finish_reason in ("stop", "length")
    without = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert unused.usage.prompt_tokens == len(tokenizer.encode(without, add_special_tokens=False))  # not shown
