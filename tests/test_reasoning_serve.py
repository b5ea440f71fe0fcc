"""`minimind serve --reasoning-parser think`: thinking in reasoning_content, the answer in content, whole or
streamed, from a tiny model fine-tuned to think before it answers."""

from __future__ import annotations

import json
import random

import openai
import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient

from minimind.cli import main
from minimind.infer import Engine
from minimind.model.hub import save_model_dir
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.reasoning import ReasoningSplitter, split_reply
from minimind.serve.scheduler import Scheduler

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


def test_streamed_pieces_add_up_to_the_whole_split():
    rng = random.Random(0)
    for reply, (thinking, answer) in REPLIES.items():
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(reply)), k=min(6, len(reply) - 1)))
            pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])]
            splitter = ReasoningSplitter(1)
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
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    for flag, expected in (([], False), (["--reasoning-parser", "think"], True)):
        assert main(["serve", "--model", str(model_dir), "--port", "0", *flag]) == 0
        assert configs[-1].split_reasoning is expected
