"""Server-sent events straight from the log: a pull consumer of the stream's own
(``core.log.reader.Puller.ephemeral``) starting after ``Last-Event-ID`` (or ``?after=``), following
live, with a comment line every 15 s to keep proxies from closing the connection. Each stream holds a
consumer, so a credential and an org may have only so many open at once
(``Limits.sse_max_per_credential``, ``sse_max_per_org``): one more is a 429.

An org's stream asked for task events only (``?types=`` naming task event types, as an approver's
inbox does) needs no consumer of its own once it is live: it reads the log up to where the gateway's
claim index is (``ClaimIndex.tail``), then is handed the task events that index follows anyway, so
the server sends each such event to this gateway once, however many streams show it. A stream that
falls ``TAIL_LIMIT`` events behind (a slow client) goes on with a consumer of its own from where it got.
Either way it sends the same events, in log order, each once."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable

import msgspec
from nats.aio.msg import Msg
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from application.claim_index import TaskTail
from application.principal import Principal
from core.domain.events import TASK_EVENT_TYPES, TaskSubmitted, WorkerRegistered, event_type_of
from core.domain.public import public_view
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject, org_events_filter, parse_aggregate_subject
from core.log.reader import Puller
from core.log.store import recorded_from_message
from gateway.http import path_id, principal, query, services, typed_text
from gateway.problems import Problem
from gateway.queries import MAX_SEQ, OrgEvents, ResumeAfter
from gateway.services import Services

_encoder = msgspec.json.Encoder()
FETCH_BATCH = 256
TAIL_LIMIT = 10_000
"""Events a stream served from the claim index's tail may fall behind before it reads the log itself."""
STREAMS_RETRY_AFTER_SECONDS = 5


async def task_events(request: Request) -> Response:
    who = await principal(request, "read")
    task_id = path_id(request, "task_id", "task")
    after = _resume_after(request, query(request, ResumeAfter))
    task, _ = await services(request).handler.load(who.org, "task", task_id)
    if task is None:
        raise Problem(404, f"task {task_id} not found")
    return await _stream(request, who, aggregate_subject(who.org, "task", task_id), after, types=None, queue=None)


async def org_events(request: Request) -> Response:
    who = await principal(request, "read")
    asked = query(request, OrgEvents)
    after = _resume_after(request, asked)
    types = asked.type_set or None
    if types is not None and types <= TASK_EVENT_TYPES:
        return await _tailed_stream(request, who, after, types=types, queue=asked.queue)
    return await _stream(request, who, org_events_filter(who.org), after, types=types, queue=asked.queue)


def _resume_after(request: Request, asked: ResumeAfter) -> int:
    """``Last-Event-ID`` when the client sends one (a reconnecting EventSource does), else ``?after=``."""
    header = [value for value in request.headers.getlist("last-event-id") if value]
    if not header:
        return asked.after
    try:
        return typed_text([("after", value) for value in header], ResumeAfter).after
    except Problem:
        raise Problem(
            422, f"Last-Event-ID must be one stream sequence number from 0 to {MAX_SEQ}, not {header[0][:32]!r}"
        ) from None


async def _stream(
    request: Request, who: Principal, subject: str, after: int, *, types: set[str] | None, queue: str | None
) -> Response:
    """Takes one of the credential's and the org's stream slots and opens the consumer before answering,
    so a refusal or a log that cannot be read is a problem+json rather than a dropped connection."""
    svc = services(request)
    _take_slot(svc, who)
    try:
        feed = await _own_consumer(svc, subject, after + 1)
    except BaseException:
        svc.streams.close(who.org, who.credential_id)
        raise
    return _EventStream(
        _follow(request, feed, types, queue),
        [feed],
        release=lambda: svc.streams.close(who.org, who.credential_id),
    )


async def _tailed_stream(
    request: Request, who: Principal, after: int, *, types: set[str], queue: str | None
) -> Response:
    """An org's stream of task events: the log up to the claim index's position, then its tail."""
    svc = services(request)
    _take_slot(svc, who)
    tail = svc.claim_index.tail(who.org, TAIL_LIMIT)
    reading = svc.store.reader.batches(org_events_filter(who.org, "task"), start_seq=after + 1)

    def release() -> None:
        svc.claim_index.untail(who.org, tail)
        svc.streams.close(who.org, who.credential_id)

    try:
        # The first read before answering: a log that cannot be read is a problem+json, not a dropped stream.
        first = [] if after >= tail.start else await anext(reading, [])
    except BaseException:
        release()
        await reading.aclose()
        raise
    feeds: list[Puller] = []  # the consumer it reads should the tail overflow, closed with the response
    events = _follow_tail(request, who.org, after, first, reading, tail, types, queue, feeds)
    return _EventStream(events, feeds, release)


def _take_slot(svc: Services, who: Principal) -> None:
    """One of the credential's and the org's stream slots, or a 429."""
    if refused := svc.streams.open(who.org, who.credential_id):
        raise Problem(429, refused, headers={"Retry-After": str(STREAMS_RETRY_AFTER_SECONDS)})


async def _own_consumer(svc: Services, subject: str, start_seq: int) -> Puller:
    """A consumer of the stream's own, pulled: no flow control to answer (a push consumer stalls when
    the stream filters events out faster than it acknowledges control messages), and the server removes
    it once nobody asks, should the response not get to."""
    return await Puller.ephemeral(
        svc.store.nc,
        svc.store.stream,
        subject,
        start_seq=start_seq,
        inactive_threshold=max(60.0, 4 * svc.limits.sse_keepalive_seconds),
    )


class _EventStream(StreamingResponse):
    """The SSE response: however it ends (the stream fails, the client goes away, the server stops), its
    slot is given back and its consumers removed (closing a puller deletes it). They are closed here,
    after the response, not in the generator: a generator cancelled with its client would be cancelled
    again inside the close, mid-way through talking to NATS."""

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        feeds: list[Puller],
        release: Callable[[], None],
    ) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._events, self._feeds, self._release = events, feeds, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()  # first, and without waiting: the slot is free however the rest goes
            with contextlib.suppress(Exception):
                await self._events.aclose()
            for feed in self._feeds:
                with contextlib.suppress(Exception):
                    await feed.close()


async def _follow(
    request: Request, puller: Puller, types: set[str] | None, queue: str | None, *, greet: bool = True
) -> AsyncGenerator[bytes, None]:
    svc = services(request)
    queues: dict[str, str | None] = {}
    if greet:
        yield b": connected\n\n"
    while True:
        # Answered as soon as an event is there (the server sends what it has at once), else after the
        # keep-alive interval with nothing.
        batch = await puller.fetch(FETCH_BATCH, svc.limits.sse_keepalive_seconds)
        if not batch:
            yield b": keepalive\n\n"
            continue
        for msg in batch:
            if types is not None and _tag_outside(msg.data, types):
                continue  # without decoding the event: most of a feed's deliveries are of other types
            if (message := await _message(request, recorded_from_message(msg), queue, queues)) is not None:
                yield message


async def _follow_tail(
    request: Request,
    org: str,
    after: int,
    first: list[Msg],
    reading: AsyncGenerator[list[Msg], None],
    tail: TaskTail,
    types: set[str],
    queue: str | None,
    feeds: list[Puller],
) -> AsyncGenerator[bytes, None]:
    """The org's task events after ``after`` of ``types``: from the log (``first``, then ``reading``) up
    to ``tail.start``, then from ``tail``; from a consumer of its own (added to ``feeds``) should the
    tail overflow."""
    svc = services(request)
    queues: dict[str, str | None] = {}
    last = after  # the last event looked at: each is sent once, in log order
    yield b": connected\n\n"
    async with contextlib.aclosing(reading):
        batch = first
        while batch:
            for msg in batch:
                seq = int((msg.headers or {})["Nats-Sequence"])  # a direct get's answer
                if seq > tail.start:
                    break  # the tail has it
                last = seq
                if _tag_outside(msg.data, types):
                    continue
                if (message := await _message(request, recorded_from_message(msg), queue, queues)) is not None:
                    yield message
            else:
                batch = await anext(reading, []) if last < tail.start else []
                continue
            break
    last = max(last, tail.start)
    while not tail.overflowed:
        events = await tail.next(svc.limits.sse_keepalive_seconds)
        if not events and not tail.overflowed:
            yield b": keepalive\n\n"
        for recorded in events:
            if recorded.seq <= last:
                continue
            last = recorded.seq
            if type(recorded.event).__struct_config__.tag not in types:  # type: ignore[attr-defined]
                continue
            if (message := await _message(request, recorded, queue, queues)) is not None:
                yield message
    # Too far behind to be kept: on with a consumer of its own, from where this stream got.
    svc.claim_index.untail(org, tail)
    feed = await _own_consumer(svc, org_events_filter(org, "task"), last + 1)
    feeds.append(feed)
    async with contextlib.aclosing(_follow(request, feed, types, queue, greet=False)) as following:
        async for message in following:
            yield message


async def _message(
    request: Request, recorded: RecordedEvent, queue: str | None, queues: dict[str, str | None]
) -> bytes | None:
    """The event as one SSE message, or None when it is not of the asked ``queue``."""
    if queue is not None and await _queue_of(request, recorded, queues) != queue:
        return None
    name = type(recorded.event).__struct_config__.tag  # type: ignore[attr-defined]
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (recorded.seq, name.encode(), _encoder.encode(_data(recorded)))


def _tag_outside(data: bytes, types: set[str]) -> bool:
    try:
        return event_type_of(data) not in types
    except msgspec.DecodeError:
        return False  # decoded in full below, which says what is wrong with it


def _data(recorded: RecordedEvent) -> dict[str, object]:
    """One SSE message: the event's public view (secret fields redacted) and where it sits in the log."""
    address = parse_aggregate_subject(recorded.subject)
    return {
        **public_view(recorded.event),
        "seq": recorded.seq,
        "org": address.org,
        "aggregate": address.aggregate,
        "aggregate_id": address.id,
        "actor": recorded.actor,
        "recorded_at": recorded.recorded_at,
    }


async def _queue_of(request: Request, recorded: RecordedEvent, known: dict[str, str | None]) -> str | None:
    """The queue an event's task or worker belongs to, learned once per aggregate and stream."""
    if isinstance(recorded.event, TaskSubmitted | WorkerRegistered):
        known[recorded.subject] = recorded.event.queue
    if recorded.subject not in known:
        address = parse_aggregate_subject(recorded.subject)
        if address.aggregate in ("task", "worker"):
            state, _ = await services(request).handler.load(address.org, address.aggregate, address.id)
            known[recorded.subject] = getattr(state, "queue", None)
        else:
            known[recorded.subject] = None
    return known[recorded.subject]
