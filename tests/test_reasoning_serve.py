"""`minimind serve --reasoning-parser think`: thinking in reasoning_content, the answer in content, whole or
streamed, from a tiny model fine-tuned to think before it answers."""

from __future__ import annotations

import json
import random

import openai
import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient
from thinking_helpers import with_thinking_template

from minimind.cli import main
from minimind.infer import Engine
from minimind.modeldir import save_model_dir
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.reasoning import ReasoningSplitter, split_reply
from minimind.serve.scheduler import Scheduler
from minimind.tokenizer.thinking import PromptThinking, has_thinking_switch

REPLIES = {
    "<think>2 plus 2 is 4.</think><answer>4</answer>": ("2 plus 2 is 4.", "4"),  # ours (distill stage)
    "<think>\nadd them\n</think>\n\nIt is 4.": ("\nadd them\n", "It is 4."),  # DeepSeek-R1 / Qwen3 style
    "  plain answer": (None, "plain answer"),
    "<think>cut off by max_tokens": ("cut off by max_tokens", ""),
    "a <think> later is text": (None, "a <think> later is text"),
    "<answer>x < y</answer> trailing": (None, "x < y"),
}


def test_split_reply_forms():
    for reply, expected in REPLIES.items():
        assert split_reply(reply) == expected, reply
    assert split_reply("<thi", final=False) == (None, "")  # may still open a think block
    assert split_reply("<think>abc</thi", final=False) == ("abc", "")
    assert split_reply("<think>a</think><answer>b</ans", final=False) == ("a", "b")


# replies to a prompt that opened the think block (thinking on): they start inside it
OPENED_REPLIES = {
    "add them\n</think>\n\nIt is 4.": ("add them\n", "It is 4."),
    "<think>\nwritten again</think>4": ("\nwritten again", "4"),
    "cut off by max_tokens": ("cut off by max_tokens", ""),
    "x < y so</think><answer>y</answer>": ("x < y so", "y"),
}
# replies to a prompt that closed an empty think block (thinking off): all answer
CLOSED_REPLIES = {"It is 4.": (None, "It is 4."), "<think>not a block</think> here": (None, "<think>not a block</think> here")}
FORMS = [(PromptThinking.REPLY, REPLIES), (PromptThinking.OPEN, OPENED_REPLIES), (PromptThinking.CLOSED, CLOSED_REPLIES)]


def test_split_reply_after_a_prompt_that_opened_or_closed_thinking():
    for prompt, replies in FORMS[1:]:
        for reply, expected in replies.items():
            assert split_reply(reply, prompt=prompt) == expected, reply
    opened = PromptThinking.OPEN
    assert split_reply("  ", final=False, prompt=opened) == (None, "")  # may still be a repeated <think>
    assert split_reply("abc</thi", final=False, prompt=opened) == ("abc", "")
    assert split_reply("<thi", final=False, prompt=PromptThinking.CLOSED) == (None, "<thi")


def test_streamed_pieces_add_up_to_the_whole_split():
    rng = random.Random(0)
    for prompt, replies in FORMS:
        for reply, (thinking, answer) in replies.items():
            for _ in range(20):
                cuts = sorted(rng.sample(range(1, len(reply)), k=min(6, len(reply) - 1)))
                pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])]
                splitter = ReasoningSplitter(1, prompt)
                out = [splitter.feed(0, piece, final=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
                assert "".join(r for r, _ in out) == (thinking or "") and "".join(c for _, c in out) == answer


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("thinker")
    save_model_dir(tiny_model(), tokenizer, root / "init")
    chat = [{"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."}]
    data = root / "reasoning.jsonl"
    data.write_text((json.dumps({"conversations": chat}) + "\n") * 16)
    assert main(["sft", "--data", str(data), "--init", str(root / "init"), "--out", str(root / "sft"),
                 "--max-steps", "60", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "5",
                 "--max-seq-len", "128", "--device", "cpu", "--dtype", "fp32"]) == 0
    return root / "sft"


def client_for(model_dir, split: bool):
    app = create_app(Scheduler(Engine.from_pretrained(model_dir, max_batch_size=2)),
                     ServeConfig(["thinker"], split_reasoning=split))
    http = TestClient(app)
    return http, openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.mark.slow
def test_reasoning_content_whole_and_streamed(thinker_dir):
    question = [{"role": "user", "content": "What is 2 plus 2?"}]
    http, client = client_for(thinker_dir, split=True)
    with http:
        reply = client.chat.completions.create(model="thinker", messages=question, temperature=0)
        message = reply.choices[0].message
        assert (message.reasoning_content, message.content) == ("2 plus 2 is 4.", "4")
        chunks = list(client.chat.completions.create(model="thinker", messages=question, temperature=0, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "2 plus 2 is 4."
        assert "".join(d.content or "" for d in deltas) == "4"
        first_content = next(i for i, d in enumerate(deltas) if d.content)
        assert not any(getattr(d, "reasoning_content", None) for d in deltas[first_content:])  # thinking first
    http, client = client_for(thinker_dir, split=False)
    with http:  # without the parser the reply is as generated
        message = client.chat.completions.create(model="thinker", messages=question, temperature=0).choices[0].message
        assert message.content == "<think>2 plus 2 is 4.</think><answer>4</answer>"
        assert getattr(message, "reasoning_content", None) is None


def test_serve_flag_turns_the_parser_on(model_dir, monkeypatch):
    import uvicorn

    import minimind.serve.app as app_module

    configs = []
    real_create_app = app_module.create_app
    monkeypatch.setattr(app_module, "create_app", lambda scheduler, config: configs.append(config)
                        or real_create_app(scheduler, config))
    monkeypatch.setattr(uvicorn.Server, "run", lambda *args, **kwargs: None)
    for flag, expected in (([], False), (["--reasoning-parser", "think"], True)):
        assert main(["serve", "--model", str(model_dir), "--port", "0", *flag]) == 0
        assert configs[-1].split_reasoning is expected


def test_chat_template_kwargs_reach_the_template_and_bad_ones_are_400(tokenizer):
    switched = with_thinking_template(tokenizer)
    assert has_thinking_switch(switched) and not has_thinking_switch(tokenizer)
    question = [{"role": "user", "content": "What is 2 plus 2?"}]

    def prompt_tokens(tok, **kwargs) -> int:
        text = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True, **kwargs)
        return len(tok.encode(text, add_special_tokens=False))

    for tok, name in ((switched, "switched"), (tokenizer, "plain")):
        app = create_app(Scheduler(Engine(tiny_model(), tok, max_batch_size=2)), ServeConfig([name]))
        with TestClient(app) as http:
            def used(kwargs):
                body = {"messages": question, "max_tokens": 1, "chat_template_kwargs": kwargs}
                answer = http.post("/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                return answer.json()["usage"]["prompt_tokens"]

            for kwargs in ({"open_thinking": True}, {"enable_thinking": True}, {"open_thinking": False}, None, {}):
                assert used(kwargs) == prompt_tokens(tok, **(kwargs or {})), kwargs
            # a template without the variable ignores it; one with it renders a different prompt
            assert (used({"open_thinking": True}) != used(None)) is (tok is switched)
            for kwargs, words in (([1], "expected an object"), ("open_thinking", "expected an object"),
                                  ({"tokenize": True}, "'tokenize' is set by the server"),
                                  ({"bos_token": "<x>"}, "'bos_token' is set by the server"),
                                  ({f"v{i}": i for i in range(65)}, "at most 64")):
                body = {"messages": question, "chat_template_kwargs": kwargs}
                answer = http.post("/v1/chat/completions", json=body)
                error = answer.json()["error"]
                assert answer.status_code == 400 and error["param"] == "chat_template_kwargs", (kwargs, answer.text)
                assert words in error["message"] and error["type"] == "invalid_request_error"
            wrong_type = http.post("/v1/chat/completions", json={"messages": question, "chat_template_kwargs":
                                                                 {"note": 5}})
            if tok is switched:  # the template adds a number to a string: the request's fault, said so
                assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "chat_template_kwargs"
            else:
                assert wrong_type.status_code == 200
            schema = http.get("/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]
            assert "chat_template_kwargs" in schema["properties"]


def test_the_parser_reads_a_reply_inside_the_think_block_the_prompt_opened(tokenizer):
    """Thinking on: the untrained model never closes the block, so all of its reply is reasoning; thinking off:
    all of it is content and reasoning_content is null."""
    switched = with_thinking_template(tokenizer)
    question = [{"role": "user", "content": "What is 2 plus 2?"}]
    engine = Engine(tiny_model(), switched, max_batch_size=2)
    replies = {}
    for split in (False, True):
        app = create_app(Scheduler(engine), ServeConfig(["m"], split_reasoning=split))
        with TestClient(app) as http:
            for on in (True, False):
                body = {"messages": question, "max_tokens": 12, "temperature": 1, "seed": 7,
                        "chat_template_kwargs": {"open_thinking": on}}
                message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
                streamed = [json.loads(line[6:]) for line in http.post(
                    "/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
                    if line.startswith("data: {")]
                deltas = [c["choices"][0]["delta"] for c in streamed if c["choices"]]
                replies[split, on] = (message.get("reasoning_content"), message["content"],
                                      "".join(d.get("reasoning_content") or "" for d in deltas) or None,
                                      "".join(d.get("content") or "" for d in deltas))
            # a grammar shapes the reply from its first token: all content
            body = {"messages": question, "max_tokens": 12, "temperature": 1, "seed": 7,
                    "chat_template_kwargs": {"open_thinking": True}, "response_format": {"type": "json_object"}}
            replies[split, "json"] = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert replies[True, "json"].get("reasoning_content") is None
    assert replies[True, "json"]["content"] == replies[False, "json"]["content"].lstrip()
    assert replies[True, "json"]["content"].startswith("{")
    raw_on, raw_off = replies[False, True][1], replies[False, False][1]
    assert "</think>" not in raw_on and raw_on.strip()
    assert replies[True, True] == (raw_on, "", raw_on, "")
    assert replies[True, False] == (None, raw_off.lstrip(), None, raw_off.lstrip())
