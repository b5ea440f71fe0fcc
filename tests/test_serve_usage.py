"""`usage` counts the prompt tokens the prefix cache served, as OpenAI reports cached prompt tokens: read back
with the official openai client (in-process app), on every generating endpoint, streamed and not."""

from __future__ import annotations

import openai
import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient

from minimind.infer import Engine
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.scheduler import Scheduler

ASK = [{"role": "system", "content": "You answer in one short sentence."},
       {"role": "user", "content": "What is the weather like in 北京 today?"}]
PROMPT = "The weather in 北京 today is sunny, and tomorrow"


def cached_counts(client: openai.OpenAI) -> dict[str, list[tuple[int, int]]]:
    """Per endpoint and form, (prompt tokens, cached tokens) of the same request sent twice."""
    chat = dict(model="tiny", messages=ASK, max_tokens=3, temperature=0)
    text = dict(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    answer = dict(model="tiny", input=ASK[1]["content"], instructions=ASK[0]["content"], max_output_tokens=3,
                  temperature=0)

    def usage_of_stream(chunks) -> tuple[int, int]:
        last = list(chunks)[-1]
        return last.usage.prompt_tokens, last.usage.prompt_tokens_details.cached_tokens

    def response_usage(response) -> tuple[int, int]:
        return response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens

    forms = {
        "chat": lambda: client.chat.completions.create(**chat).usage,
        "chat stream": lambda: usage_of_stream(client.chat.completions.create(
            **chat, stream=True, stream_options={"include_usage": True})),
        "text": lambda: client.completions.create(**text).usage,
        "text stream": lambda: usage_of_stream(client.completions.create(
            **text, stream=True, stream_options={"include_usage": True})),
        "text n=2": lambda: client.completions.create(**text, n=2).usage,
        "responses": lambda: response_usage(client.responses.create(**answer)),
        "responses stream": lambda: response_usage(list(client.responses.create(**answer, stream=True))[-1].response),
    }
    counts = {}
    for name, send in forms.items():
        pairs = [send() for _ in range(2)]
        counts[name] = [pair if isinstance(pair, tuple) else
                        (pair.prompt_tokens, pair.prompt_tokens_details.cached_tokens) for pair in pairs]
    return counts


@pytest.mark.parametrize("prefix_cache_tokens", [512, 0])
def test_usage_reports_the_prompt_tokens_the_prefix_cache_served(tokenizer, prefix_cache_tokens):
    engine = Engine(tiny_model(), tokenizer, max_batch_size=2, prefix_cache_tokens=prefix_cache_tokens)
    with TestClient(create_app(Scheduler(engine), ServeConfig(["tiny"]))) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        counts = cached_counts(client)
    for name, ((prompt, first), (again, second)) in counts.items():
        assert prompt == again > 8, name
        if prefix_cache_tokens:
            # a prompt met before comes back from the cache but its last token (prefilled for the next logits);
            # n=2 counts its one prompt once, as prompt_tokens does
            assert second == prompt - 1, name
        else:
            assert first == second == 0, name
    assert counts["chat"][0][1] == 0  # the server's first request found nothing cached
