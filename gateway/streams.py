"""Server-sent events straight from the log: an ordered JetStream consumer starting after
``Last-Event-ID`` (or ``?after=``), following live, with a comment line every 15 s to keep proxies
from closing the connection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from core.events import EVENT_TYPES, TaskSubmitted, WorkerRegistered
from core.store import RecordedEvent, recorded_from_message
from core.subjects import aggregate_subject, org_events_filter, parse_aggregate_subject
from gateway.http import path_id, principal, services
from gateway.problems import Problem

_encoder = msgspec.json.Encoder()
FETCH_BATCH = 256


async def task_events(request: Request) -> Response:
    who = await principal(request, "read")
    task_id = path_id(request, "task_id", "task")
    task, _ = await services(request).handler.load(who.org, "task", task_id)
    if task is None:
        raise Problem(404, f"task {task_id} not found")
    return _stream(request, aggregate_subject(who.org, "task", task_id), types=None, queue=None)


async def org_events(request: Request) -> Response:
    who = await principal(request, "read")
    raw_types = request.query_params.get("types")
    types = None if not raw_types else {t.strip() for t in raw_types.split(",") if t.strip()}
    if types and (unknown := types - set(EVENT_TYPES)):
        raise Problem(422, f"unknown event types {sorted(unknown)}; known: {sorted(EVENT_TYPES)}")
    return _stream(request, org_events_filter(who.org), types=types, queue=request.query_params.get("queue"))


def _stream(request: Request, subject: str, *, types: set[str] | None, queue: str | None) -> Response:
    after = _resume_after(request)
    return StreamingResponse(
        _follow(request, subject, after, types, queue),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _resume_after(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not raw.isdigit():
        raise Problem(422, f"Last-Event-ID / after must be a stream sequence number, not {raw!r}")
    return int(raw)


async def _follow(
    request: Request, subject: str, after: int, types: set[str] | None, queue: str | None
) -> AsyncIterator[bytes]:
    svc = services(request)
    js = svc.store.nc.jetstream()
    # An ephemeral pull consumer: no flow control to answer (a push consumer stalls when this loop
    # filters events out faster than it acknowledges control messages), and the server removes it
    # once we stop asking.
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after else DeliverPolicy.ALL,
        opt_start_seq=after + 1 if after else None,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=max(60.0, 4 * svc.limits.sse_keepalive_seconds),
        mem_storage=True,
    )
    subscription = await js.pull_subscribe(subject, stream=svc.store.stream, config=config)
    queues: dict[str, str | None] = {}
    try:
        yield b": connected\n\n"
        while True:
            try:
                batch = await subscription.fetch(FETCH_BATCH, timeout=svc.limits.sse_keepalive_seconds)
            except (NatsTimeoutError, TimeoutError):  # nats-py raises either when nothing came
                yield b": keepalive\n\n"
                continue
            for msg in batch:
                recorded = recorded_from_message(msg)
                name = type(recorded.event).__struct_config__.tag  # type: ignore[attr-defined]
                if types is not None and name not in types:
                    continue
                if queue is not None and await _queue_of(request, recorded, queues) != queue:
                    continue
                yield b"id: %d\nevent: %s\ndata: %s\n\n" % (
                    recorded.seq,
                    name.encode(),
                    _encoder.encode(_data(recorded)),
                )
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


def _data(recorded: RecordedEvent) -> dict[str, object]:
    address = parse_aggregate_subject(recorded.subject)
    return {
        **msgspec.to_builtins(recorded.event),
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
