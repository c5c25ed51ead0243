"""How the client talks HTTP, written once for both the blocking and the asyncio client.

Everything the client does (a request and its retries, paging, following an event stream, the worker
loop) is an *operation*: a generator that yields effects (:class:`Send` a request, :class:`Sleep`,
:class:`Open` a stream and :class:`ReadLine` from it, :class:`Start` a handler and :class:`Join` it,
:class:`Emit` a value to the caller) and receives each effect's outcome, or has its error thrown in.
``controlplane.client.drivers`` performs the effects, over ``httpx.Client`` or ``httpx.AsyncClient``,
knowing nothing about the API.

Transient failures are retried, never reported: a 429, 502, 503 or 504, or a connection that cannot
be made or breaks, is tried again after a bounded exponential backoff with full jitter, and never
sooner than the answer's ``Retry-After``. Every POST carries an ``Idempotency-Key`` that its retries
reuse, so the retry of a request whose answer was lost returns the original outcome and appends
nothing. Past the retry budget a call raises :class:`Unavailable`."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeAlias, TypeVar

import httpx
import msgspec

from controlplane.client.errors import ProblemError, Unavailable, problem_class

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 5.0
MAX_RETRY_AFTER_SECONDS = 60.0
"""A ``Retry-After`` beyond this is waited for only this long (then the budget decides)."""
RETRY_BUDGET_SECONDS = 60.0
"""How long one call keeps retrying."""


def backoff_delay(
    attempt: int,
    retry_after: float | None = None,
    *,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
    draw: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first): uniformly drawn below
    ``base * 2**attempt`` bounded by ``cap`` (full jitter, so many clients do not retry in step), and at
    least the server's ``Retry-After`` (itself bounded by :data:`MAX_RETRY_AFTER_SECONDS`)."""
    jittered = draw() * min(cap, base * 2 ** min(attempt, 32))
    if retry_after is None:
        return jittered
    return max(jittered, min(max(retry_after, 0.0), MAX_RETRY_AFTER_SECONDS))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


class _ProblemBody(msgspec.Struct):
    type: str = "about:blank"
    title: str | None = None
    detail: str | None = None


def problem_from(response: httpx.Response) -> ProblemError:
    """The error an error answer stands for. A body that is not problem+json (a proxy's HTML page, say)
    still gives the right class; its text becomes the detail."""
    status = response.status_code
    try:
        problem = msgspec.json.decode(response.content, type=_ProblemBody)
    except msgspec.DecodeError:  # ValidationError included: JSON of another shape
        problem = _ProblemBody(detail=response.text[:500] or None)
    return problem_class(status)(
        status,
        problem.title or response.reason_phrase,
        problem.detail or f"{response.request.method} {response.request.url.path} answered {status}",
        problem.type,
        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
    )


def raise_for_problem(response: httpx.Response) -> None:
    if response.is_error:
        raise problem_from(response)


# --- requests and effects --------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request, as every attempt of it is sent. A POST gets its ``Idempotency-Key`` here, once,
    so all its retries carry the same one."""

    method: str
    path: str
    params: Mapping[str, str | int] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    """Seconds for connecting and for each read; None for the client's default."""

    @classmethod
    def of(
        cls,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str | int | None] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Call:
        """A JSON request; ``body`` None sends none. Parameters that are None are left out."""
        headers = {**(headers or {}), **({"Idempotency-Key": uuid.uuid4().hex} if method == "POST" else {})}
        content = None
        if body is not None:
            content = msgspec.json.encode(body)  # msgspec: integers beyond 64 bits and Structs encode too
            headers["Content-Type"] = "application/json"
        kept = None if params is None else {name: value for name, value in params.items() if value is not None}
        return cls(method, path, kept, content, headers, timeout)


@dataclass(frozen=True)
class Send:
    """Send ``call`` once; the outcome is the answer, read in full (or the transport's error)."""

    call: Call


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(eq=False)
class Feed:
    """An open streamed answer and its lines, in the driver's own form (None for a refused answer)."""

    response: httpx.Response
    lines: Any


@dataclass(frozen=True)
class Open:
    """Send ``call`` and keep the answer open; the outcome is a :class:`Feed`. An answer that is not a
    2xx is read in full and closed at once (its feed has no lines), so its problem can be read."""

    call: Call


@dataclass(frozen=True)
class ReadLine:
    """The feed's next line, or None when the server ended it; ``TimeoutError`` if none came within
    ``timeout`` seconds (a read the server keeps alive with comments still ends on time)."""

    feed: Feed
    timeout: float | None = None


@dataclass(frozen=True)
class Close:
    feed: Feed


@dataclass(frozen=True)
class Emit:
    """Hand ``value`` to the caller iterating the operation."""

    value: Any


@dataclass(frozen=True)
class Start:
    """Run ``work(argument)`` beside the operation (a thread, or an asyncio task for a coroutine
    function); the outcome is a job to :class:`Join`."""

    work: Callable[[Any], Any]
    argument: Any


@dataclass(frozen=True)
class Finished:
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Join:
    """Wait up to ``timeout`` seconds for a started job: the outcome is its :class:`Finished`, or None
    if it still runs."""

    job: Any
    timeout: float


Effect: TypeAlias = Send | Sleep | Open | ReadLine | Close | Emit | Start | Join
Op: TypeAlias = Generator[Effect, Any, T]
"""An operation that ends with a T; one that emits values is iterated instead."""


def exchange(call: Call, retry_seconds: float = RETRY_BUDGET_SECONDS) -> Op[httpx.Response]:
    """The first answer to ``call`` that is not transient, retried with backoff within the retry budget."""
    started = time.monotonic()
    attempt = 0
    while True:
        retry_after = None
        try:
            response = yield Send(call)
        except httpx.TransportError as exc:
            failure: str = repr(exc)
            cause: BaseException | None = exc
        else:
            if response.status_code not in TRANSIENT_STATUSES:
                return response  # type: ignore[no-any-return]
            cause = problem_from(response)
            failure = f"{response.status_code} {response.text[:200]}"
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        delay = backoff_delay(attempt, retry_after)
        waited = time.monotonic() - started
        if waited + delay > retry_seconds:
            raise Unavailable(
                503,
                "Service unavailable",
                f"{call.method} {call.path}: {failure}; gave up after {attempt + 1} attempts in {waited:.1f} s",
            ) from cause
        log.info("%s %s: %s; retry %d in %.2f s", call.method, call.path, failure, attempt + 1, delay)
        yield Sleep(delay)
        attempt += 1
