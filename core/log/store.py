"""The event store: one JetStream stream holding every org's log.

Append publishes a command's events (and the schedules of the timers they arm) with per-subject
optimistic concurrency (``Nats-Expected-Last-Subject-Sequence``) and ``Nats-Msg-Id`` dedup; more than
one message goes as one atomic batch, so a command is never half-written. Reading an aggregate uses
batched direct get on its subject, through :class:`core.log.reader.LogReader`.

This is the production :class:`core.log.event_store.EventStore`; the append metadata and the refusals
are defined there, the record type in :mod:`core.domain.records`, both storage-neutral."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError
from nats.js.kv import KeyValue

from core.domain.events import Event, decode_event, encode_event
from core.domain.records import RecordedEvent, rfc3339
from core.domain.subjects import STREAM_SUBJECTS
from core.log.event_store import (
    DUPLICATE_WINDOW_SECONDS,
    TIMER_ACTOR,
    AppendMeta,
    DuplicateAppend,
    EventTooLarge,
    Schedule,
    StoreError,
    WrongExpectedSequence,
)
from core.log.nats_version import require_nats_version
from core.log.reader import LogReader

STREAM_NAME = "CP_EVENTS"
ACK_TIMEOUT_SECONDS = 5.0

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
H_ACTOR = "Cp-Actor"
H_CORRELATION = "Cp-Correlation-Id"
H_CAUSATION = "Cp-Causation-Id"
H_TIME = "Cp-Time"
H_TRACEPARENT = "traceparent"
"""The W3C trace context of the command that appended the event (set only while tracing is on): how a
span in another process (a projection batch, a runner continuing a task) joins the command's trace."""

_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_BATCH_DUPLICATE_MSG_ID = 10201


_BATCH_HEADERS_SIZE = 200
"""Room for the Nats-Batch-* headers an event of a batch gets on top of its own (an id of at most
~100 bytes, a sequence and the commit mark)."""


def _encoded_header_size(headers: dict[str, str]) -> int:
    """Bytes of the headers as nats-py sends them: ``NATS/1.0\r\n``, ``name: value\r\n`` each, ``\r\n``."""
    return 12 + sum(len(name.encode()) + len(value.encode()) + 4 for name, value in headers.items())


def server_urls(url: str | list[str]) -> list[str]:
    """The servers nats-py should try, from ``"nats://a:4222,nats://b:4222"`` or a list."""
    candidates = url.split(",") if isinstance(url, str) else url
    servers = [candidate.strip() for candidate in candidates if candidate.strip()]
    if not servers:
        raise ValueError(f"no NATS server URL in {url!r}")
    return servers


class JetStreamEventStore:
    def __init__(self, nc: NATS, *, stream: str = STREAM_NAME) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self._ack_prefix = nc.new_inbox()
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ack_counter = itertools.count()
        self._ack_subscription: Subscription | None = None
        self._purge_api = f"$JS.API.STREAM.PURGE.{stream}"
        self.reader = LogReader(nc, stream)
        """How this store reads: by batched direct get on its connection (``core.log.reader``)."""

    @classmethod
    async def connect(
        cls, url: str | list[str], *, stream: str = STREAM_NAME, provision: bool = True, **options: Any
    ) -> JetStreamEventStore:
        """``url`` names one server or several (a list, or comma-separated as ``--nats-url`` and dev.json
        carry a cluster's); the client moves to another when its server goes away and never gives up."""
        defaults: dict[str, Any] = {
            "name": "controlplane",
            "max_reconnect_attempts": -1,
            # A server that hangs without closing the socket is left after ~30 s, not nats-py's ~6 min.
            "ping_interval": 10,
            "max_outstanding_pings": 3,
        }
        nc = await nats.connect(server_urls(url), **{**defaults, **options})
        version = nc.connected_server_version
        require_nats_version(f"{version.major}.{version.minor}.{version.patch}")
        store = cls(nc, stream=stream)
        if provision:
            await store.provision()
        return store

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[dict[str, Any]]:
        """Publish and return a future of the JetStream ack, without waiting for it: messages on one
        connection reach the server in the order sent, so several can share one round trip."""
        if self._ack_subscription is None:
            self._ack_subscription = await self._nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
        token = str(next(self._ack_counter))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        await self._nc.publish(subject, payload, reply=f"{self._ack_prefix}.{token}", headers=headers)
        return future

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.pop(msg.subject.rsplit(".", 1)[1], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(StoreError(f"no JetStream stream answers for {self.stream}"))
            return
        try:
            future.set_result(msgspec.json.decode(msg.data))
        except ValueError as exc:
            future.set_exception(StoreError(f"unreadable ack from the log: {msg.data[:200]!r}: {exc}"))

    async def _ack(self, future: asyncio.Future[dict[str, Any]], msg_id: str | None = None) -> int:
        try:
            async with asyncio.timeout(ACK_TIMEOUT_SECONDS):
                return _sequence_from_ack(await future, msg_id)
        except TimeoutError as exc:
            raise StoreError("the log did not acknowledge the append in time") from exc

    @property
    def nc(self) -> NATS:
        return self._nc

    async def close(self) -> None:
        if self._nc.is_closed:
            return
        if self._nc.is_connected:
            await self._nc.drain()
        else:  # reconnecting: nothing in flight can be flushed, so just stop
            await self._nc.close()

    async def provision(self, *, replicas: int | None = None) -> None:
        """Create the stream or bring its configuration up to date. ``replicas=None`` keeps an existing
        stream's replica count (1 for a new stream): every process provisions on connect, and none of
        them may scale a clustered log down."""
        config = StreamConfig(
            name=self.stream,
            subjects=list(STREAM_SUBJECTS),
            storage=StorageType.FILE,
            num_replicas=replicas or 1,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            allow_direct=True,
            allow_atomic=True,
            allow_msg_schedules=True,
        )
        try:
            await self._js.add_stream(config)
        except APIError as exc:
            if exc.err_code != 10058:  # stream name already in use with a different configuration
                raise
            if replicas is None:
                config.num_replicas = (await self._js.stream_info(self.stream)).config.num_replicas
            await self._js.update_stream(config)

    async def last_seq(self) -> int:
        info = await self._js.stream_info(self.stream)
        return info.state.last_seq

    async def key_value(self, bucket: str, *, ttl_seconds: float) -> KeyValue:
        """A key-value bucket beside the log, created on first use with as many replicas as the log:
        on a cluster its entries must survive losing a node, as the events do."""
        try:
            return await self._js.key_value(bucket)
        except BucketNotFoundError:
            replicas = (await self._js.stream_info(self.stream)).config.num_replicas or 1
            config = KeyValueConfig(bucket=bucket, history=1, ttl=ttl_seconds, replicas=replicas)
            return await self._js.create_key_value(config)

    # --- append -----------------------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        events: Sequence[Event],
        *,
        expected_last_seq: int,
        meta: AppendMeta,
        schedules: Sequence[Schedule] = (),
    ) -> list[int]:
        """Append a command's events; returns the stream sequence of each.

        Timer schedules are published first, pipelined with the events on one connection, so the
        common case costs one round trip. A schedule armed for a command whose events are then
        refused is purged again; if even that fails it fires as a no-op, because a fired timer counts
        only if the state still wants exactly it. Events of one command are all-or-nothing: one event
        is a plain publish, several are an atomic batch."""
        if not events:
            raise ValueError("a command must append at least one event")
        messages = [
            (subject, encode_event(event), self._event_headers(event, meta, index, expected_last_seq))
            for index, event in enumerate(events)
        ]
        self._check_sizes(messages, batched=len(messages) > 1)
        timers = self._schedule_messages(schedules, meta)
        armed = [(schedule, await self._send(*timer)) for schedule, timer in zip(schedules, timers, strict=True)]
        try:
            if len(messages) == 1:  # through our ack inbox: cheaper than nats-py's request (random token, wait_for)
                subject_, payload, headers = messages[0]
                last_seq = await self._ack(await self._send(subject_, payload, headers), headers[MSG_ID])
            else:
                last_seq = await self._publish_batch(messages)
        except BaseException:
            await self._disarm(armed)
            raise
        await self._confirm_armed(armed, meta)
        return list(range(last_seq - len(events) + 1, last_seq + 1))

    def _schedule_messages(
        self, schedules: Sequence[Schedule], meta: AppendMeta
    ) -> list[tuple[str, bytes, dict[str, str]]]:
        """The timer definitions as messages, each checked against the server's size limit."""
        messages = [(s.subject, encode_event(s.event), self._schedule_headers(s, meta)) for s in schedules]
        self._check_sizes(messages, batched=False)
        return messages

    def _check_sizes(self, messages: Sequence[tuple[str, bytes, dict[str, str]]], *, batched: bool) -> None:
        limit = self._nc.max_payload
        for subject, payload, headers in messages:
            size = len(payload) + _encoded_header_size(headers) + (_BATCH_HEADERS_SIZE if batched else 0)
            if size > limit:
                raise EventTooLarge(
                    f"an event for {subject} takes {size} bytes with its headers; the log takes at most {limit}"
                )

    async def _disarm(self, armed: list[tuple[Schedule, asyncio.Future[dict[str, Any]]]]) -> None:
        for schedule, ack_future in armed:
            try:
                seq = await self._ack(ack_future)
                # Only this definition: the command that won may have armed the same timer on the subject.
                await self._js.delete_msg(self.stream, seq)
            except Exception:  # it will fire as a no-op
                log.info("could not disarm %s after a refused append", schedule.subject, exc_info=True)

    async def _confirm_armed(
        self, armed: list[tuple[Schedule, asyncio.Future[dict[str, Any]]]], meta: AppendMeta
    ) -> None:
        """The events are committed: make sure every timer they rely on is stored."""
        for schedule, ack_future in armed:
            try:
                await self._ack(ack_future)
                continue
            except Exception:
                log.warning("arming %s was not acknowledged; arming it again", schedule.subject, exc_info=True)
            for attempt in range(3):
                try:
                    await self._js.publish(
                        schedule.subject, encode_event(schedule.event), headers=self._schedule_headers(schedule, meta)
                    )
                    break
                except Exception:
                    await asyncio.sleep(0.05 * 2**attempt)
            else:
                log.error("timer %s could not be armed; `controlplane timers reconcile` re-arms it", schedule.subject)

    @staticmethod
    def _event_headers(event: Event, meta: AppendMeta, index: int, expected_last_seq: int) -> dict[str, str]:
        headers = {
            MSG_ID: f"{meta.command_id}:{index}",
            H_ACTOR: meta.actor,
            H_TIME: rfc3339(meta.time),
        }
        if index == 0:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_seq)
        if meta.correlation_id:
            headers[H_CORRELATION] = meta.correlation_id
        if meta.causation_id:
            headers[H_CAUSATION] = meta.causation_id
        if meta.traceparent:
            headers[H_TRACEPARENT] = meta.traceparent
        return headers

    @staticmethod
    def _schedule_headers(schedule: Schedule, meta: AppendMeta) -> dict[str, str]:
        # These headers are copied onto the fired message: it must not claim the arming command's id.
        headers = {
            "Nats-Schedule": f"@at {rfc3339(schedule.event.at)}",
            "Nats-Schedule-Target": schedule.target,
            H_ACTOR: TIMER_ACTOR,
            H_CAUSATION: meta.command_id,
            H_TIME: rfc3339(schedule.event.at),
        }
        if meta.correlation_id:
            headers[H_CORRELATION] = meta.correlation_id
        if meta.traceparent:  # the fired timer's event belongs to the trace that armed it
            headers[H_TRACEPARENT] = meta.traceparent
        return headers

    async def _publish_batch(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> int:
        batch_id = messages[0][2].get(MSG_ID, "batch").replace(":", "-")
        last = len(messages)
        # Messages on one connection arrive in order, so only the commit needs a round trip.
        for number, (subject, payload, headers) in enumerate(messages[:-1], start=1):
            await self._nc.publish(
                subject, payload, headers={**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(number)}
            )
        subject, payload, headers = messages[-1]
        commit = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(last), "Nats-Batch-Commit": "1"}
        return await self._ack(await self._send(subject, payload, commit), headers[MSG_ID])

    async def holds(self, subject: str) -> bool:
        """Whether the stream holds a message on ``subject`` (for a timer: armed and not yet fired)."""
        return await self.reader.last(subject) is not None

    async def arm(self, schedules: Sequence[Schedule], meta: AppendMeta) -> None:
        """Store timer definitions outside a command: how the reconciler re-arms lost timers."""
        for timer in self._schedule_messages(schedules, meta):
            await self._ack(await self._send(*timer))

    async def cancel_schedules(self, subjects: Sequence[str], *, older_than_seq: int) -> None:
        """Ask the log to remove timer definitions stored before ``older_than_seq`` (a newer re-arm
        survives), without waiting for its answer: one that stays fires as a no-op, which is all a
        refused or lost purge could ever cause, so an answer would change nothing but the cost (a
        JetStream API round trip for every retired timer: ~3 per task, one per heartbeat)."""
        for subject in subjects:
            body = msgspec.json.encode({"filter": subject, "seq": older_than_seq})
            await self._nc.publish(self._purge_api, body)

    # --- read -------------------------------------------------------------------------------------

    async def read_subject(self, subject: str, *, after_seq: int = 0) -> list[RecordedEvent]:
        """Every event on ``subject`` after ``after_seq``, in order."""
        return [recorded_from_message(msg) for msg in await self.reader.read(subject, after_seq=after_seq)]


def recorded_from_message(msg: Msg) -> RecordedEvent:
    """A stored event from a direct-get reply or a consumer delivery."""
    headers = msg.headers or {}
    if "Nats-Sequence" in headers:
        return _recorded(int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data, headers)
    metadata = msg.metadata
    return _recorded(metadata.sequence.stream, msg.subject, msg.data, headers, metadata.timestamp)


def _recorded(
    seq: int, subject: str, data: bytes, headers: dict[str, str], stored_at: datetime | None = None
) -> RecordedEvent:
    stamp = headers.get(H_TIME) or headers.get("Nats-Time-Stamp")
    recorded_at = stored_at or (_parse_time(stamp) if stamp else datetime.now(UTC))
    return RecordedEvent(
        seq=seq,
        subject=subject,
        event=decode_event(data),
        recorded_at=recorded_at,
        command_id=command_id_of(headers.get(MSG_ID)),
        actor=headers.get(H_ACTOR),
        correlation_id=headers.get(H_CORRELATION),
        causation_id=headers.get(H_CAUSATION),
        traceparent=headers.get(H_TRACEPARENT),
    )


def command_id_of(msg_id: str | None) -> str | None:
    """The command that appended an event, from its ``Nats-Msg-Id`` header (``<command id>:<index>``).
    Fired timers carry no message id (their schedule had none), so they never count as part of the
    command that armed them."""
    return msg_id.rpartition(":")[0] or None if msg_id else None


def _parse_time(value: str) -> datetime:
    # The server writes nanoseconds; datetime keeps microseconds.
    if "." in value:
        head, frac = value.rstrip("Z").split(".", 1)
        value = f"{head}.{frac[:6]}+00:00"
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _sequence_from_ack(ack: dict[str, Any], msg_id: str | None) -> int:
    if "error" in ack:
        _raise_for_error(ack["error"].get("err_code"), ack["error"].get("description", ""))
    if ack.get("duplicate"):
        raise DuplicateAppend(msg_id or "")
    return int(ack["seq"])


def _raise_for_error(err_code: int | None, description: str) -> None:
    if err_code == _ERR_WRONG_LAST_SEQUENCE:
        raise WrongExpectedSequence(description)
    if err_code == _ERR_BATCH_DUPLICATE_MSG_ID:
        raise DuplicateAppend(description)
    raise StoreError(f"the log refused the append: {description} (err_code {err_code})")
