"""Slots of the real server: a client that goes away frees its slot; a full queue answers 429.

The server runs with two slots (--max-batch-size 2) and one waiting place (--max-queue 1) on a tiny model with
a long context, so an abandoned request would keep its slot for thousands of steps. A witness request holds the
other slot and counts its chunks: the engine's steps are the clock, so no assertion compares durations.
"""

from __future__ import annotations

import json
import socket
import threading
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
    args = ["serve", "--model", str(long_model_dir), "--port", str(port), "--max-batch-size", "2",
            "--max-queue", "1", "--log-level", "warning"]
    with running_server(args, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


def long_body(stream: bool) -> dict:
    return {"prompt": "MiniMind", "max_tokens": LONG, "temperature": 1.0, "seed": 0, "ignore_eos": True,
            "stream": stream}


def active(server) -> int:
    return httpx.get(f"{server}/health").json()["active"]


def wait_idle(server, seconds: float = 120.0) -> None:
    """Until no request is in flight (a safety net against a hang, not a measure: the tests count tokens)."""
    deadline = time.monotonic() + seconds
    while active(server):
        assert time.monotonic() < deadline, "a request still holds its slot"
        time.sleep(0.05)


class Witness:
    """A long streamed request running beside the others and counting its chunks in a thread: the server
    decodes every running sequence once per step, so the count is a clock in engine steps, not in seconds."""

    def __init__(self, server: str):
        self.chunks = 0
        self._started = threading.Event()
        self._http = httpx.Client(timeout=120)
        self._response = self._http.send(self._http.build_request(
            "POST", f"{server}/v1/completions", json=long_body(True)), stream=True)
        assert self._response.status_code == 200
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self._started.wait(120), "the witness got no token"

    def _read(self) -> None:
        try:
            for _ in sse_events(self._response.iter_lines()):
                self.chunks += 1
                self._started.set()
        except httpx.HTTPError:  # closed by `close`
            pass

    def close(self) -> None:
        self._response.close()
        self._http.close()
        self._thread.join(30)


@pytest.fixture
def witness(server):
    seen = Witness(server)
    yield seen
    seen.close()
    wait_idle(server)


def read_chunks(response: httpx.Response, count: int) -> Iterator[str]:
    """Read `count` chunks of a text-completion stream; -> the rest of the stream.

    The rest must be kept: dropping httpx's line iterator closes the response (a disconnect).
    """
    lines = sse_events(response.iter_lines())
    for _ in range(count):
        json.loads(next(lines))
    return lines


def steps_taken_by_a_short_request(server, witness: Witness) -> int:
    """Chunks the witness got while a 4-token request was answered. With a slot free that is a few steps;
    with both slots held (the abandoned request still running beside the witness) the short request has to
    wait for one of them to end: thousands of steps."""
    before = witness.chunks
    reply = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=120)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4
    return witness.chunks - before


def test_disconnect_mid_stream_frees_the_slot(server, witness):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server}/v1/completions", json=long_body(True)) as response:
            assert response.status_code == 200
            _rest = read_chunks(response, 30)
            assert active(server) == 2  # the witness and this one: both slots held
    assert steps_taken_by_a_short_request(server, witness) < LONG // 4


def test_non_streaming_client_that_gives_up_is_released(server, witness):
    body = json.dumps(long_body(False)).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        deadline = time.monotonic() + 120
        while active(server) < 2:  # it is running: the state, not a time, says when to give up
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    # the socket is closed: the client gave up with the answer thousands of tokens away
    assert steps_taken_by_a_short_request(server, witness) < LONG // 4


def test_full_queue_answers_429_and_recovers(server, witness):
    with httpx.Client(timeout=60) as second, httpx.Client(timeout=60) as third:
        with second.stream("POST", f"{server}/v1/completions", json=long_body(True)) as running:
            _rest = read_chunks(running, 2)
            with third.stream("POST", f"{server}/v1/completions", json=long_body(True)) as waiting:
                assert waiting.status_code == 200  # accepted into the one waiting place
                assert active(server) == 3
                refused = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == "queue_full"
    assert steps_taken_by_a_short_request(server, witness) < LONG // 4  # both released, a slot is free
