"""The scheduler: one thread owns the Engine and steps it while any request is live (continuous batching).

    scheduler = Scheduler(engine, max_queue=64).start()
    for out in scheduler.stream(prompt_ids, SamplingParams(max_new_tokens=32)):   # from any thread
        print(out.text, end="")
    scheduler.close()

The Engine is not thread-safe, so only the scheduler thread calls `add`/`step`/`release`. Other threads (the
server's event loop, Streamlit sessions) hand it `Job`s through a queue; each job carries a `deliver`
callback that the scheduler thread calls with every `StepOutput` of that job (or an exception if the job
failed). The thread's loop: take every pending add/cancel command, then one `engine.step()` — which decodes
one token for all running requests in a single forward and prefills newly admitted ones — and deliver the
outputs. Requests therefore join and leave the batch between any two steps. With nothing live the thread
sleeps on the command queue.

Admission is bounded: at most `max_batch_size` jobs run and `max_queue` more may wait; `submit` raises
`QueueFull` beyond that (the server answers 429). `cancel` releases jobs that are waiting or running (a
client went away): their cache rows are freed before the next step. A job with a `deadline` that is still
live when it passes ends with finish_reason "length" (the server's --request-timeout). `drain(grace)` (on
SIGTERM) refuses new jobs at once and ends every job still live `grace` seconds later with `ShuttingDown`.

For metrics (`serve/metrics.py`) the scheduler keeps `running` (jobs holding a KV-cache row after the last step)
and `waiting`, stamps each job with when it was submitted and got its first token, and tells an optional
`SchedulerObserver` about every job's new tokens and its end, on the scheduler thread.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from minimind.infer.engine import Engine, StepOutput
from minimind.infer.sampling import SamplingParams
from minimind.tokenizer.tool_calls import renders_tools

log = logging.getLogger("minimind.serve")

Event = StepOutput | BaseException


class QueueFull(Exception):
    """The scheduler already holds as many jobs as it may (running + waiting), or is shutting down."""


class ShuttingDown(RuntimeError):
    """The server is stopping: a job still live at the shutdown deadline ends with this error."""


@dataclass(eq=False)
class Job:
    """One sequence to generate. `deliver` is called on the scheduler thread with each output or an error."""

    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() past which the job ends with finish_reason "length"
    completion_tokens: int = field(default=0, init=False)  # generated so far (scheduler thread)
    accepted: bool = field(default=False, init=False)  # submitted (counted in `active`)
    request_id: int | None = field(default=None, init=False)  # the engine's id, set on the scheduler thread
    done: bool = field(default=False, init=False)  # finished, cancelled or failed; counted out of `active`
    submitted_at: float = field(default=0.0, init=False)  # time.monotonic() at `submit`
    first_token_at: float | None = field(default=None, init=False)  # time.monotonic() of its first output
    cached_tokens: int = field(default=0, init=False)  # prompt tokens the engine's prefix cache gave (first output)


class SchedulerObserver:
    """What the scheduler thread reports as jobs progress (the server's metrics); these defaults ignore it all.

    Every method runs on the scheduler thread, so it must be quick and must not raise.
    """

    def on_tokens(self, job: Job, new_tokens: int, first: bool) -> None:
        """`job` produced `new_tokens` more tokens in the last step (`first`: its first output, after prefill)."""

    def on_end(self, job: Job, event: Event | None) -> None:
        """`job` is done: its final `StepOutput`, the error it failed with, or None when it was cancelled."""


class PromptEncoder:
    """The Engine's prompt encoding (`encode`, `chat_prompt`) on a private tokenizer copy.

    The engine's own tokenizer belongs to the scheduler thread (it detokenizes every step); request handlers
    tokenize prompts with this copy. The two methods are the Engine's, which read only `tokenizer` and
    `vocab_size`, so prompts are encoded exactly as `Engine.add` would encode them.
    """

    encode = Engine.encode
    chat_prompt = Engine.chat_prompt

    def __init__(self, engine: Engine):
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.vocab_size = engine.vocab_size
        self.max_seq_len = engine.max_seq_len
        self.renders_tools = renders_tools(self.tokenizer)  # whether `tools` reach the model at all


class Scheduler:
    """Owns an Engine on one thread and serves jobs submitted from any thread; see the module doc."""

    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.capacity = engine.max_batch_size + max_queue
        self.prompts = PromptEncoder(engine)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._active = 0  # submitted jobs not yet done
        self._closed = False
        self.draining = False  # set by `drain`: no new jobs
        self._drain_at: float | None = None  # when live jobs are ended (scheduler thread)
        self._live: dict[int, Job] = {}  # engine request id -> job (scheduler thread only)
        self._thread = threading.Thread(target=self._run, name="minimind-scheduler", daemon=True)
        self.observer = SchedulerObserver()  # replaced (before `start`) by whoever wants progress reports
        self.running = 0  # jobs holding a KV-cache row after the last step (written by the scheduler thread)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; jobs still live get a RuntimeError."""
        with self._lock:  # under the lock: no "add" can be queued behind the "stop"
            self._closed = True
            self._commands.put(("stop", []))
        if self._thread.is_alive():
            self._thread.join()

    def drain(self, grace: float) -> None:
        """Refuse new jobs from now on and end the live ones after `grace` seconds with ShuttingDown.

        Takes no lock and only queues a command, so a signal handler may call it; only the first call counts.
        """
        if self.draining:
            return
        self.draining = True
        self._commands.put(("drain", time.monotonic() + grace))

    @property
    def alive(self) -> bool:
        """The scheduler thread is running."""
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        """Jobs submitted and not yet finished (running or waiting)."""
        return self._active

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet holding a KV-cache row (queued here or for prefill)."""
        return max(self._active - self.running, 0)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all or none); raises QueueFull when they would exceed `capacity`."""
        with self._lock:
            if self._closed or self.draining:
                raise QueueFull("the server is shutting down")
            if self._active + len(jobs) > self.capacity:
                raise QueueFull(f"the server is busy ({self._active} requests in flight, room for {self.capacity})")
            self._active += len(jobs)
            now = time.monotonic()
            for job in jobs:
                job.accepted = True
                job.submitted_at = now
            self._commands.put(("add", list(jobs)))

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Release jobs (waiting or running); those done or never accepted are ignored. Safe to repeat."""
        live = [job for job in jobs if job.accepted and not job.done]
        if live:
            self._commands.put(("cancel", live))

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Submit one job and yield its outputs on the calling thread (blocking); closing the iterator early
        cancels the job. Raises QueueFull at the call and the job's error, if any, while iterating."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        job = Job(prompt_ids, params, events.put)
        self.submit([job])
        return self._follow(job, events)

    def _follow(self, job: Job, events: queue.SimpleQueue) -> Iterator[StepOutput]:
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finished:
                    return
        finally:
            self.cancel([job])

    # ---- the scheduler thread ----

    def _run(self) -> None:
        while True:
            try:
                if not self._serve_once():
                    return
            except Exception as err:  # a bug here must not leave every client waiting forever
                log.exception("scheduler error")
                self._fail_all(err)

    def _serve_once(self) -> bool:
        """Apply pending commands, then one engine step; False once asked to stop."""
        for kind, jobs in self._take_commands(wait=not self._live):  # with nothing live, sleep here
            if kind == "stop":
                self._fail_all(ShuttingDown("the server is shutting down"))
                return False
            if kind == "drain":
                self._drain_at = jobs  # (here the deadline, not jobs)
                continue
            for job in jobs:
                (self._add if kind == "add" else self._release)(job)
        self._expire()
        if self._live:
            self._step()
        self.running = self.engine.num_running
        return True

    def _expire(self) -> None:
        """End jobs past their deadline ("length", with what they generated), or all of them once draining ends."""
        now = time.monotonic()
        if self._drain_at is not None and now >= self._drain_at:
            self._fail_all(ShuttingDown("the server is shutting down"))
            return
        for request_id, job in list(self._live.items()):
            if job.deadline is not None and now >= job.deadline:
                self.engine.release(request_id)
                del self._live[request_id]
                self._finish(job, StepOutput(request_id, [], "", True, "length", len(job.prompt_ids),
                                             job.completion_tokens))

    def _take_commands(self, wait: bool) -> list[tuple[str, list[Job]]]:
        commands = [self._commands.get()] if wait else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, job: Job) -> None:
        if job.done:
            return
        try:
            job.request_id = self.engine.add(job.prompt_ids, job.params)
        except Exception as err:  # the handler validated the request; this is a last line of defence
            self._finish(job, err)
            return
        self._live[job.request_id] = job

    def _release(self, job: Job) -> None:
        if job.done:
            return
        if job.request_id is not None:
            self.engine.release(job.request_id)
            self._live.pop(job.request_id, None)
        job.done = True
        self._count_out(1)
        self.observer.on_end(job, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # a bug or a device error: fail what is in flight, keep serving
            log.exception("engine step failed")
            self._fail_all(err)
            return
        now = time.monotonic()
        for output in outputs:
            job = self._live.get(output.request_id)
            if job is None:
                continue
            first = job.first_token_at is None
            if first:
                job.first_token_at, job.cached_tokens = now, output.cached_tokens
            self.observer.on_tokens(job, output.completion_tokens - job.completion_tokens, first)
            job.completion_tokens = output.completion_tokens
            if output.finished:
                del self._live[output.request_id]
                self._finish(job, output)
            else:
                _deliver(job, output)

    def _finish(self, job: Job, event: Event) -> None:
        job.done = True
        self._count_out(1)
        self.observer.on_end(job, event)
        _deliver(job, event)

    def _fail_all(self, err: BaseException) -> None:
        for request_id, job in list(self._live.items()):
            try:
                self.engine.release(request_id)
            except Exception:  # after a failed step the engine may be inconsistent; the job fails anyway
                log.exception("releasing request %d failed", request_id)
            self._finish(job, err)
        self._live.clear()

    def _count_out(self, n: int) -> None:
        with self._lock:
            self._active -= n


def _deliver(job: Job, event: Event) -> None:
    try:
        job.deliver(event)
    except Exception:  # a receiver that is gone (closed event loop) must not stop the scheduler
        log.debug("dropped an output for a receiver that is gone", exc_info=True)
