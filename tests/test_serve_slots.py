"""Slots of the real server: a client that goes away frees its slot; a full queue answers 429.

The server runs with one slot (--max-batch-size 1) and one waiting place (--max-queue 1) on a tiny model
with a long context, so an abandoned request would keep the slot for many seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import tiny_model
from serve_helpers import free_port, running_server, sse_events

pytestmark = pytest.mark.slow  # one server start (imports torch + transformers) is ~10 s here

LONG = 8000  # tokens an abandoned request would still want


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tokenizer):
    from minimind.modeldir import save_model_dir

    out = tmp_path_factory.mktemp("long-model")
    save_model_dir(tiny_model(max_seq_len=LONG + 192), tokenizer, out)
    return out


@pytest.fixture(scope="module")
def server(long_model_dir):
    port = free_port()
    args = ["serve", "--model", str(long_model_dir), "--port", str(port), "--max-batch-size", "1",
            "--max-queue", "1", "--log-level", "warning"]
    with running_server(args, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


def long_body(stream: bool) -> dict:
    return {"prompt": "MiniMind", "max_tokens": LONG, "temperature": 1.0, "seed": 0, "ignore_eos": True,
            "stream": stream}


def active(server) -> int:
    return httpx.get(f"{server}/health").json()["active"]


def wait_idle(server, seconds: float) -> float:
    """Seconds until no request is in flight (fails after `seconds`)."""
    start = time.monotonic()
    while active(server):
        assert time.monotonic() - start < seconds, "the abandoned request still holds its slot"
        time.sleep(0.05)
    return time.monotonic() - start


def read_chunks(response: httpx.Response, count: int) -> tuple[Iterator[str], float]:
    """Read `count` chunks of a text-completion stream; -> (the rest of the stream, seconds per chunk).

    The rest must be kept: dropping httpx's line iterator closes the response (a disconnect).
    """
    lines = sse_events(response.iter_lines())
    json.loads(next(lines))
    start = time.monotonic()
    for _ in range(count):
        json.loads(next(lines))
    return lines, (time.monotonic() - start) / count


def test_disconnect_mid_stream_frees_the_slot(server):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server}/v1/completions", json=long_body(True)) as response:
            assert response.status_code == 200
            _rest, per_chunk = read_chunks(response, 30)
            assert active(server) == 1
    # the abandoned request would need about (LONG - 31) chunks' time more (a chunk is one token or more)
    remaining = (LONG - 31) * per_chunk
    start = time.monotonic()
    reply = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
    elapsed = time.monotonic() - start
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4
    assert elapsed < remaining / 4, (elapsed, remaining)
    assert active(server) == 0


def test_non_streaming_client_that_gives_up_is_released(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=long_body(False), timeout=1.5)
    wait_idle(server, seconds=5)
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_full_queue_answers_429_and_recovers(server):
    with httpx.Client(timeout=60) as first, httpx.Client(timeout=60) as second:
        with first.stream("POST", f"{server}/v1/completions", json=long_body(True)) as running:
            _rest, _ = read_chunks(running, 2)
            with second.stream("POST", f"{server}/v1/completions", json=long_body(True)) as waiting:
                assert waiting.status_code == 200  # accepted into the one waiting place
                assert active(server) == 2
                refused = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == "queue_full"
    wait_idle(server, seconds=5)
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
