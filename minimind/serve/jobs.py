"""A request's generation jobs as the handlers see them: submitted together, their outputs on an asyncio queue,
released however the response ends (done, failed, or the client went away); shared by every /v1 endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from minimind.infer.engine import StepOutput
from minimind.serve.protocol import APIError
from minimind.serve.reasoning import ReasoningSplitter, split_reply
from minimind.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from minimind.serve.tools import ToolCallReader


@dataclass
class Readers:
    """What reads a chat choice's text before it goes out: thinking split off first, then function calls."""

    tools: ToolCallReader | None = None
    reasoning: ReasoningSplitter | None = None

    def feed(self, index: int, text: str, final: bool) -> tuple[str, str]:
        """-> (reasoning, content) of newly generated text that can be sent now."""
        thinking = ""
        if self.reasoning is not None:
            thinking, text = self.reasoning.feed(index, text, final)
        if self.tools is not None:
            text = self.tools.feed(index, text)
        return thinking, text

    def whole(self, text: str) -> tuple[str | None, str | None, list[dict] | None]:
        """-> (reasoning, content, calls) of a finished reply, for a non-streaming response."""
        thinking = None
        if self.reasoning is not None:
            thinking, text = split_reply(text, prompt=self.reasoning.prompt)
        if self.tools is None:
            return thinking, text, None
        return (thinking, *self.tools.message(text))


class Choices:
    """The jobs of one request and the asyncio queue their outputs arrive on, as (choice index, event)."""

    def __init__(self, scheduler: Scheduler, prompts: list[list[int]], params: list, deadline: float | None = None):
        loop = asyncio.get_running_loop()
        self.scheduler = scheduler
        self.queue: asyncio.Queue = asyncio.Queue()

        def deliver_to(index: int):
            return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        self.jobs = [Job(ids, p, deliver_to(i), deadline) for i, (ids, p) in enumerate(zip(prompts, params))]
        try:
            scheduler.submit(self.jobs)
        except QueueFull as err:
            if scheduler.draining:
                raise shutting_down() from None
            raise APIError(429, f"{err}; retry shortly", None, "queue_full", kind="rate_limit_error") from None

    async def events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """Outputs in arrival order until every choice has finished; a job's error is raised."""
        remaining = len(self.jobs)
        while remaining:
            index, event = await self.queue.get()
            if isinstance(event, BaseException):
                raise event
            if event.finished:
                remaining -= 1
            yield index, event

    def cancel(self) -> None:
        self.scheduler.cancel(self.jobs)

    def cached_tokens(self, n: int = 1) -> int:
        """Prompt tokens the prefix cache served, once the choices have started: per prompt (each `n` consecutive
        jobs share one), the fewest that any of its choices reused, summed over the prompts (as `prompt_tokens`
        counts each prompt once)."""
        return sum(min(job.cached_tokens for job in self.jobs[i : i + n]) for i in range(0, len(self.jobs), n))


class EventStream(StreamingResponse):
    """An SSE response that releases its jobs however it ends: done, failed, or the client went away.

    Starlette cancels the body when the client disconnects; releasing here rather than in the body's
    generator also covers a disconnect before the generator ever started.
    """

    def __init__(self, chunks: AsyncIterator[str], choices: Choices):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.choices = choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.choices.cancel()


async def collect_or_leave(request: Request, choices: Choices, collect: Coroutine) -> bool:
    """Run `collect` (which reads `choices.events()`) to the end; False when the client disconnected first.
    The jobs are released either way; SIGTERM's deadline becomes a 503."""
    work = asyncio.ensure_future(collect)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            return False
        work.result()
    except ShuttingDown:
        raise shutting_down() from None
    finally:
        gone.cancel()
        choices.cancel()
    return True


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another server or after it restarts", None,
                    "server_shutting_down", kind="server_error")


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so this only waits)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
