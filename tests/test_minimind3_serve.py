"""minimind-3's chat format shown working end to end: a tokenizer trained with `--template minimind3`, a tiny
model fine-tuned on tool chats and thinking chats rendered with it, and the real `minimind serve
--reasoning-parser think` process answering the openai SDK with tool calls, and with `reasoning_content` when
the request turns thinking on (`chat_template_kwargs`) and none when it is off."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import SAMPLE_TEXT, tiny_model
from serve_helpers import finetune, free_port, running_server
from test_tool_calls import TOOLS, time_chat, weather_chat

from minimind.cli import main
from minimind.modeldir import save_model_dir
from minimind.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # two tokenizers, an SFT run and one server start

QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]
THOUGHT, ANSWER = "2 plus 2 is 4.", "4"
HELLO = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there."}]


@pytest.fixture(scope="module")
def minimind3_dir(tmp_path_factory):
    """A tiny model with a minimind-3 tokenizer, fine-tuned until it repeats its chats: two that call a tool,
    one that thinks before it answers, one that just answers."""
    root = tmp_path_factory.mktemp("minimind3")
    records = [{"tools": TOOLS, "conversations": weather_chat()}, {"tools": TOOLS, "conversations": time_chat()},
               {"conversations": [*QUESTION, {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}]},
               {"conversations": HELLO}]

    def tokenizer(texts: list[str], vocab_size: int, out: str):
        corpus = root / f"{out}.jsonl"
        corpus.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts) * 50)
        assert main(["tokenizer", "--data", str(corpus), "--vocab-size", str(vocab_size), "--template", "minimind3",
                     "--out", str(root / out)]) == 0
        return load_tokenizer(root / out)

    # a draft renders the chats, so the tokenizer's merges fit the chat format too (the chats stay short)
    draft = tokenizer(SAMPLE_TEXT, 300, "draft")
    rendered = [draft.apply_chat_template(r["conversations"], tools=r.get("tools"), tokenize=False) for r in records]
    save_model_dir(tiny_model(max_seq_len=512), tokenizer([*SAMPLE_TEXT, *rendered], 512, "tokenizer"), root / "init")
    return finetune(records, root / "init", root / "sft", steps=80, max_seq_len=384, lr="5e-3")


@pytest.fixture(scope="module")
def client(minimind3_dir):
    port = free_port()
    args = ["serve", "--model", str(minimind3_dir), "--port", str(port), "--served-model-name", "minimind",
            "--reasoning-parser", "think",
            "--device", "cpu", "--log-level", "warning"]
    with running_server(args, f"http://127.0.0.1:{port}/health"):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="minimind", messages=messages, temperature=0, max_tokens=64, **kwargs)


def test_the_template_is_minimind3s(minimind3_dir):
    tokenizer = load_tokenizer(minimind3_dir)
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    on, off = (tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, open_thinking=v)
               for v in (True, False))
    assert on.endswith("<|im_start|>assistant\n<think>\n") and off.endswith("<think>\n\n</think>\n\n")


def test_a_tool_chat_answers_with_tool_calls(client):
    reply = ask(client, weather_chat()[:1], tools=TOOLS)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert getattr(choice.message, "reasoning_content", None) is None  # thinking off: the prompt closed the block
    history = [*weather_chat()[:1], choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}]
    after = ask(client, history, tools=TOOLS).choices[0]
    assert (after.message.content, after.finish_reason) == ("18 degrees in Paris.", "stop")


def test_thinking_on_gives_reasoning_content_and_off_gives_none(client):
    on = {"chat_template_kwargs": {"open_thinking": True}}
    message = ask(client, QUESTION, extra_body=on).choices[0].message
    assert (message.reasoning_content, message.content) == (THOUGHT + "\n", ANSWER)  # the template's newline
    chunks = list(ask(client, QUESTION, extra_body=on, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == ANSWER
    qwen3_name = ask(client, QUESTION, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert qwen3_name.choices[0].message.reasoning_content == message.reasoning_content
    for off in ({"chat_template_kwargs": {"open_thinking": False}}, None):  # off, and the template's default
        plain = ask(client, HELLO[:1], extra_body=off).choices[0].message
        assert (getattr(plain, "reasoning_content", None), plain.content) == (None, "Hi there.")
        unthought = ask(client, QUESTION, extra_body=off).choices[0].message  # it learned this one with thinking
        assert getattr(unthought, "reasoning_content", None) is None and "think>" not in unthought.content
