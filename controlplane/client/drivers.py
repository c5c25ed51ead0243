"""The two drivers that perform operations' effects (:mod:`controlplane.client.transport`):
:class:`SyncDriver` with blocking I/O over ``httpx.Client``, :class:`AsyncDriver` with asyncio over
``httpx.AsyncClient``. Neither knows anything about the API; whatever way an operation ends, a driver
closes the streams it left open and stops the jobs it started."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from controlplane.client.transport import (
    Call,
    Close,
    Effect,
    Emit,
    Feed,
    Finished,
    Join,
    Op,
    Open,
    ReadLine,
    Send,
    Sleep,
    Start,
)

T = TypeVar("T")


def _request(http: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
    timeout = httpx.USE_CLIENT_DEFAULT if call.timeout is None else call.timeout
    return http.build_request(
        call.method, call.path, params=call.params, content=call.content, headers=call.headers, timeout=timeout
    )


class SyncDriver:
    """Performs operations' effects with blocking I/O; a handler runs in a thread of its own."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http
        self._threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="controlplane-job")

    def close(self) -> None:
        self._threads.shutdown(wait=False)
        self._http.close()

    def run(self, op: Op[T]) -> T:
        steps = self._drive(op)
        try:
            while True:
                next(steps)
        except StopIteration as finished:
            return finished.value  # type: ignore[no-any-return]

    def iterate(self, op: Op[None]) -> Iterator[Any]:
        yield from self._drive(op)

    def _drive(self, op: Op[T]) -> Generator[Any, None, T]:
        """Steps ``op``, yielding what it emits; however it ends, the feeds it left open are closed."""
        feeds: set[Feed] = set()
        outcome: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    effect = op.send(outcome) if error is None else op.throw(error)
                except StopIteration as finished:
                    return finished.value  # type: ignore[no-any-return]
                outcome, error = None, None
                if isinstance(effect, Emit):
                    yield effect.value
                    continue
                try:
                    outcome = self._perform(effect, feeds)
                except Exception as exc:  # the operation's to handle (a retry) or to raise
                    error = exc
        finally:
            op.close()
            for feed in feeds:
                feed.response.close()

    def _perform(self, effect: Effect, feeds: set[Feed]) -> Any:
        match effect:
            case Send(call):
                return self._http.send(_request(self._http, call))
            case Sleep(seconds):
                time.sleep(seconds)
            case Open(call):
                response = self._http.send(_request(self._http, call), stream=True)
                if not response.is_success:
                    response.read()
                    response.close()
                    return Feed(response, None)
                feed = Feed(response, _pump(response))
                feeds.add(feed)
                return feed
            case ReadLine(feed, timeout):
                try:
                    line = feed.lines.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no line within {timeout:.2f} s") from None
                if isinstance(line, Exception):
                    raise line
                return line
            case Close(feed):
                feeds.discard(feed)
                feed.response.close()
            case Start(work, argument):
                return self._threads.submit(work, argument)
            case Join(job, timeout):
                done, _ = concurrent.futures.wait([job], timeout)
                if not done:
                    return None
                return Finished(error=job.exception()) if job.exception() else Finished(value=job.result())
        return None


def _pump(response: httpx.Response) -> queue.SimpleQueue[str | Exception | None]:
    """The response's lines, read by a thread of their own into a queue: a blocking read cannot be
    given a deadline, a queue can. The lines end with None, or with the error that ended the reading
    (closing the response ends it too)."""
    lines: queue.SimpleQueue[str | Exception | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            for line in response.iter_lines():
                lines.put(line)
        except Exception as exc:  # the connection broke, went silent or was closed: the reader is told
            lines.put(exc)
        else:
            lines.put(None)

    threading.Thread(target=read, name="controlplane-feed", daemon=True).start()
    return lines


@dataclass(frozen=True)
class _Returned(Generic[T]):
    value: T


class AsyncDriver:
    """Performs operations' effects with asyncio; a coroutine-function handler runs as a task, any
    other in a thread."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def close(self) -> None:
        await self._http.aclose()

    async def run(self, op: Op[T]) -> T:
        async with contextlib.aclosing(self._drive(op)) as steps:  # closed at once: its feeds with it
            async for step in steps:
                if isinstance(step, _Returned):
                    return step.value  # type: ignore[no-any-return]
        raise AssertionError("an operation's driver always ends with its result")

    async def iterate(self, op: Op[None]) -> AsyncIterator[Any]:
        async with contextlib.aclosing(self._drive(op)) as steps:
            async for step in steps:
                if not isinstance(step, _Returned):
                    yield step

    async def _drive(self, op: Op[T]) -> AsyncGenerator[Any, None]:
        """Steps ``op``, yielding what it emits and, last, its result as :class:`_Returned` (an async
        generator cannot return a value); however it ends, its feeds are closed and its jobs cancelled."""
        feeds: set[Feed] = set()
        jobs: list[asyncio.Future[Any]] = []
        outcome: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    effect = op.send(outcome) if error is None else op.throw(error)
                except StopIteration as finished:
                    yield _Returned(finished.value)
                    return
                outcome, error = None, None
                if isinstance(effect, Emit):
                    yield effect.value
                    continue
                try:
                    outcome = await self._perform(effect, feeds, jobs)
                except Exception as exc:  # the operation's to handle (a retry) or to raise
                    error = exc
        finally:
            op.close()
            for job in jobs:
                job.cancel()
            for feed in feeds:
                await feed.response.aclose()

    async def _perform(self, effect: Effect, feeds: set[Feed], jobs: list[asyncio.Future[Any]]) -> Any:
        match effect:
            case Send(call):
                return await self._http.send(_request(self._http, call))
            case Sleep(seconds):
                await asyncio.sleep(seconds)
            case Open(call):
                response = await self._http.send(_request(self._http, call), stream=True)
                if not response.is_success:
                    await response.aread()
                    await response.aclose()
                    return Feed(response, None)
                feed = Feed(response, response.aiter_lines())
                feeds.add(feed)
                return feed
            case ReadLine(feed, timeout):
                return await asyncio.wait_for(anext(feed.lines, None), timeout)
            case Close(feed):
                feeds.discard(feed)
                await feed.response.aclose()
            case Start(work, argument):
                running = work(argument) if _is_coroutine_function(work) else asyncio.to_thread(work, argument)
                job = asyncio.ensure_future(running)
                jobs.append(job)
                return job
            case Join(job, timeout):
                done, _ = await asyncio.wait({job}, timeout=timeout)
                if not done:
                    return None
                jobs.remove(job)
                return Finished(error=job.exception()) if job.exception() else Finished(value=job.result())
        return None


def _is_coroutine_function(work: Callable[[Any], Any]) -> bool:
    """True for an ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(work) or inspect.iscoroutinefunction(type(work).__call__)
