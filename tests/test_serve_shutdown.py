"""The server stops cleanly and never leaves a connection hanging.

SIGTERM: new requests get 503 at once; running ones get --shutdown-timeout seconds, then each open stream ends
with an error event (code "server_shutting_down") and `[DONE]`, and the process exits. A request that runs past
--request-timeout ends with finish_reason "length" and what it generated. The engine is slowed down (a sleep
per step) so that requests are still running when the deadline comes.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
import time

import httpx
import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient
from serve_helpers import free_port, running_server, sse_events

from minimind.infer import Engine
from minimind.infer.sampling import SamplingParams
from minimind.serve.app import ServeConfig, create_app
from minimind.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown

LONG = 4096  # context of the test model: long enough that no request ends by itself during a test


def slow_engine(tokenizer, monkeypatch, seconds: float = 0.01) -> Engine:
    engine = Engine(tiny_model(max_seq_len=LONG), tokenizer, max_batch_size=4)
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(seconds), real_step())[1])
    return engine


def submit(scheduler: Scheduler, deadline: float | None = None) -> queue.SimpleQueue:
    events: queue.SimpleQueue = queue.SimpleQueue()
    scheduler.submit([Job([1, 5, 6], SamplingParams(max_new_tokens=LONG - 8, ignore_eos=True), events.put, deadline)])
    return events


def last_event(events: queue.SimpleQueue, timeout: float = 10.0):
    """The job's final output or error (waiting at most `timeout` seconds in all)."""
    deadline = time.monotonic() + timeout
    while True:
        event = events.get(timeout=max(deadline - time.monotonic(), 0.01))
        if isinstance(event, BaseException) or event.finished:
            return event


def test_a_job_past_its_deadline_ends_with_length_and_its_tokens(tokenizer, monkeypatch):
    scheduler = Scheduler(slow_engine(tokenizer, monkeypatch)).start()
    try:
        started = time.monotonic()
        final = last_event(submit(scheduler, deadline=started + 0.3))
        assert final.finished and final.finish_reason == "length"
        assert 0 < final.completion_tokens < LONG - 8 and time.monotonic() - started < 3
        assert scheduler.active == 0
    finally:
        scheduler.close()


def test_drain_refuses_new_jobs_and_ends_live_ones_after_the_grace(tokenizer, monkeypatch):
    scheduler = Scheduler(slow_engine(tokenizer, monkeypatch)).start()
    try:
        events = submit(scheduler)
        assert not isinstance(events.get(timeout=10), BaseException)  # it runs
        started = time.monotonic()
        scheduler.drain(0.3)
        with pytest.raises(QueueFull, match="shutting down"):
            submit(scheduler)
        assert isinstance(last_event(events), ShuttingDown)
        assert 0.25 < time.monotonic() - started < 3
        assert scheduler.active == 0
    finally:
        scheduler.close()


BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG - 64, "ignore_eos": True}


@pytest.fixture
def app_parts(tokenizer, monkeypatch):
    scheduler = Scheduler(slow_engine(tokenizer, monkeypatch))
    return scheduler, create_app(scheduler, ServeConfig(["tiny"], request_timeout=0.5))


def test_request_timeout_ends_a_reply_with_length(app_parts):
    scheduler, app = app_parts
    with TestClient(app) as client:
        started = time.monotonic()
        reply = client.post("/v1/chat/completions", json=BODY)
        assert reply.status_code == 200 and time.monotonic() - started < 5
        body = reply.json()
        assert body["choices"][0]["finish_reason"] == "length" and 0 < body["usage"]["completion_tokens"] < LONG - 64
        with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as stream:
            events = list(sse_events(stream.iter_lines()))
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_draining_ends_an_open_stream_with_an_error_event_and_refuses_new_requests(app_parts):
    scheduler, app = app_parts
    with TestClient(app) as client:
        body = {**BODY, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(sse_events(lines))
            assert json.loads(first)["choices"][0]["delta"]["role"] == "assistant"
            scheduler.drain(0.0)
            rest = list(sse_events(lines))
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == "server_shutting_down"
        refused = client.post("/v1/chat/completions", json=BODY)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"


@pytest.mark.slow
def test_sigterm_with_an_open_stream(tmp_path, tokenizer):
    """A real `minimind serve`: SIGTERM mid-stream; the stream gets its final event and [DONE] within the
    shutdown timeout, and the process exits."""
    from minimind.modeldir import save_model_dir

    model = save_model_dir(tiny_model(max_seq_len=32768), tokenizer, tmp_path / "long")
    port = free_port()
    args = ["serve", "--model", str(model), "--port", str(port), "--shutdown-timeout", "1", "--log-level", "warning"]
    with running_server(args, f"http://127.0.0.1:{port}/health") as proc:
        body = {**BODY, "max_tokens": 30000, "stream": True}
        received: list[str] = []
        first = threading.Event()

        def read() -> None:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
                for event in sse_events(r.iter_lines()):
                    received.append(event)
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        time.sleep(0.3)  # some tokens out
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        reader.join(30)
        ended = time.monotonic() - sent
        assert not reader.is_alive() and received[-1] == "[DONE]", received[-3:]
        assert json.loads(received[-2])["error"]["code"] == "server_shutting_down"
        assert len(received) > 3 and ended < 5  # tokens streamed, then cut at the 1 s deadline
        proc.wait(timeout=15)
        assert time.monotonic() - sent < 15
