"""Server-sent events straight from the log: a pull consumer of the stream's own
(``core.log.reader.Puller.ephemeral``) starting after ``Last-Event-ID`` (or ``?after=``), following
live, with a comment line every 15 s to keep proxies from closing the connection. Each stream holds a
consumer, so a credential and an org may have only so many open at once
(``Limits.sse_max_per_credential``, ``sse_max_per_org``): one more is a 429."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from application.principal import Principal
from core.domain.events import TaskSubmitted, WorkerRegistered, event_type_of
from core.domain.public import public_view
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject, org_events_filter, parse_aggregate_subject
from core.log.reader import Puller
from core.log.store import recorded_from_message
from gateway.http import path_id, principal, query, services, typed_text
from gateway.problems import Problem
from gateway.queries import MAX_SEQ, OrgEvents, ResumeAfter

_encoder = msgspec.json.Encoder()
FETCH_BATCH = 256
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
    subject = org_events_filter(who.org)
    return await _stream(request, who, subject, after, types=asked.type_set or None, queue=asked.queue)


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
    if refused := svc.streams.open(who.org, who.credential_id):
        raise Problem(429, refused, headers={"Retry-After": str(STREAMS_RETRY_AFTER_SECONDS)})
    try:
        # A consumer of the stream's own, pulled: no flow control to answer (a push consumer stalls when
        # the stream filters events out faster than it acknowledges control messages), and the server
        # removes it once nobody asks, should the response not get to.
        feed = await Puller.ephemeral(
            svc.store.nc,
            svc.store.stream,
            subject,
            start_seq=after + 1,
            inactive_threshold=max(60.0, 4 * svc.limits.sse_keepalive_seconds),
        )
    except BaseException:
        svc.streams.close(who.org, who.credential_id)
        raise
    return _EventStream(
        _follow(request, feed, types, queue),
        feed,
        release=lambda: svc.streams.close(who.org, who.credential_id),
    )


class _EventStream(StreamingResponse):
    """The SSE response: however it ends (the stream fails, the client goes away, the server stops), its
    slot is given back and its consumer removed (closing the puller deletes it)."""

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        feed: Puller,
        release: Callable[[], None],
    ) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._events, self._feed, self._release = events, feed, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()  # first, and without waiting: the slot is free however the rest goes
            with contextlib.suppress(Exception):
                await self._events.aclose()
            with contextlib.suppress(Exception):
                await self._feed.close()


async def _follow(
    request: Request, puller: Puller, types: set[str] | None, queue: str | None
) -> AsyncGenerator[bytes, None]:
    svc = services(request)
    queues: dict[str, str | None] = {}
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
            recorded = recorded_from_message(msg)
            name = type(recorded.event).__struct_config__.tag  # type: ignore[attr-defined]
            if queue is not None and await _queue_of(request, recorded, queues) != queue:
                continue
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (
                recorded.seq,
                name.encode(),
                _encoder.encode(_data(recorded)),
            )


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
