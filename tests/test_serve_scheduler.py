"""The scheduler in-process: concurrent jobs from many threads, cancellation, a bounded queue, errors."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import tiny_model

from minimind.errors import UserError
from minimind.infer import Engine, SamplingParams
from minimind.serve.scheduler import Job, QueueFull, Scheduler


@pytest.fixture
def scheduler(tokenizer):
    scheduler = Scheduler(Engine(tiny_model(), tokenizer, max_batch_size=4), max_queue=2).start()
    yield scheduler
    scheduler.close()


def wait_until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


class StepGate:
    """The scheduler's engine takes a decode step only when the test allows one, so no job can finish (or get
    further) behind the test's back, however fast the machine: the test counts steps, not seconds."""

    def __init__(self, engine: Engine):
        self._permits = threading.Semaphore(0)
        self._open = False
        real_step = engine.step

        def step():
            if not self._open:
                self._permits.acquire()
            return real_step()

        engine.step = step

    def allow(self, steps: int = 1) -> None:
        """Let `steps` more steps run. One is enough for the scheduler to take the commands queued before it:
        its loop applies every pending command, then steps."""
        self._permits.release(steps)

    def open(self) -> None:
        self._open = True
        self._permits.release(1)


@pytest.fixture
def gate(scheduler):
    gate = StepGate(scheduler.engine)
    yield gate
    gate.open()  # before the scheduler fixture closes it


def test_jobs_from_many_threads_match_each_alone(scheduler, tokenizer):
    reference = Engine(tiny_model(), tokenizer)
    prompts = [reference.encode(f"MiniMind {i} plus {i}") for i in range(6)]
    params = [SamplingParams(max_new_tokens=12 + i, temperature=0.8 * (i % 2), seed=i) for i in range(6)]
    expected = [reference.completions([p], q)[0] for p, q in zip(prompts, params)]
    results: dict[int, list] = {}

    def client(i: int) -> None:
        results[i] = list(scheduler.stream(prompts[i], params[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]  # 6 jobs > 4 rows: some wait
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for i, want in enumerate(expected):
        outputs = results[i]
        assert "".join(o.text for o in outputs) == want.text
        assert [t for o in outputs for t in o.token_ids] == want.token_ids
        assert outputs[-1].finished and outputs[-1].finish_reason == want.finish_reason
        assert not any(o.finished for o in outputs[:-1])
    assert scheduler.active == 0


def test_closing_a_stream_early_releases_its_row(scheduler, gate):
    stream = scheduler.stream([1, 5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
    gate.allow(1)
    next(stream)
    assert scheduler.active == 1 and scheduler.engine.num_running == 1  # 1 of 200 tokens: it cannot have ended
    stream.close()
    gate.allow(1)
    wait_until(lambda: scheduler.active == 0 and scheduler.engine.num_running == 0)


def test_bounded_queue_refuses_all_or_nothing(scheduler, gate):
    def job() -> Job:
        return Job([1, 5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True), lambda event: None)

    held = [job() for _ in range(6)]  # 4 rows + 2 waiting places
    scheduler.submit(held)
    with pytest.raises(QueueFull):
        scheduler.submit([job()])
    scheduler.cancel(held[:2])
    gate.allow(1)  # at most a step or two in all here: none of the 200-token jobs can finish on its own
    wait_until(lambda: scheduler.active == 4)
    extra = [job(), job(), job()]
    with pytest.raises(QueueFull):
        scheduler.submit(extra)  # only two places are free: none of the three is taken
    assert scheduler.active == 4
    scheduler.submit(extra[:2])
    scheduler.cancel(held + extra)
    gate.allow(1)
    wait_until(lambda: scheduler.active == 0 and not scheduler.engine.has_work)


def test_a_job_the_engine_refuses_fails_alone(scheduler):
    too_long = list(range(3, 3 + scheduler.engine.max_seq_len))
    with pytest.raises(UserError, match="context"):
        list(scheduler.stream(too_long, SamplingParams()))
    outputs = list(scheduler.stream([1, 5], SamplingParams(max_new_tokens=3)))
    assert outputs[-1].finished and outputs[-1].completion_tokens <= 3
    assert scheduler.active == 0


def test_prompt_encoder_matches_the_engine(scheduler):
    messages = [{"role": "user", "content": "你好 MiniMind"}]
    assert scheduler.prompts.chat_prompt(messages) == scheduler.engine.chat_prompt(messages)
    assert scheduler.prompts.encode("hello") == scheduler.engine.encode("hello")
    assert scheduler.prompts.tokenizer is not scheduler.engine.tokenizer


def test_close_fails_live_jobs_and_refuses_new_ones(tokenizer):
    scheduler = Scheduler(Engine(tiny_model(), tokenizer, max_batch_size=2)).start()
    gate = StepGate(scheduler.engine)
    stream = scheduler.stream([1, 5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
    gate.allow(1)
    next(stream)
    gate.allow(1)  # the step the thread waits in, then it takes the stop: the job is live when it stops
    scheduler.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        list(stream)
    with pytest.raises(QueueFull):
        scheduler.stream([1, 5], SamplingParams())


def test_a_failing_step_fails_its_jobs_and_the_scheduler_keeps_serving(scheduler, monkeypatch):
    real_step = scheduler.engine.step

    def broken_step():
        monkeypatch.setattr(scheduler.engine, "step", real_step)  # fail once
        raise RuntimeError("device lost")

    monkeypatch.setattr(scheduler.engine, "step", broken_step)
    with pytest.raises(RuntimeError, match="device lost"):
        list(scheduler.stream([1, 5, 6], SamplingParams(max_new_tokens=5)))
    outputs = list(scheduler.stream([1, 5, 6], SamplingParams(max_new_tokens=5)))
    assert outputs[-1].finished and scheduler.alive and scheduler.active == 0


def test_health_is_503_without_a_running_scheduler(tokenizer):
    from fastapi.testclient import TestClient

    from minimind.serve.app import ServeConfig, create_app

    scheduler = Scheduler(Engine(tiny_model(), tokenizer))
    app = create_app(scheduler, ServeConfig(["m"]))
    assert TestClient(app).get("/health").status_code == 503  # no lifespan: the thread never started
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok", "active": 0}
        reply = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
    assert not scheduler.alive  # shutdown stopped it
