"""The event store: one JetStream stream holding every org's log.

Append publishes a command's events (and the schedules of the timers they arm) with per-subject
optimistic concurrency (``Nats-Expected-Last-Subject-Sequence``) and ``Nats-Msg-Id`` dedup; more than
one message goes as one atomic batch, so a command is never half-written. Reading an aggregate uses
batched direct get on its subject."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from core.embedded import require_nats_version
from core.events import AnyEvent, Event, decode_event, encode_event
from core.subjects import STREAM_SUBJECTS

STREAM_NAME = "CP_EVENTS"
DUPLICATE_WINDOW_SECONDS = 120.0
READ_BATCH = 512

H_COMMAND = "Cp-Command-Id"
H_ACTOR = "Cp-Actor"
H_CORRELATION = "Cp-Correlation-Id"
H_CAUSATION = "Cp-Causation-Id"
H_TIME = "Cp-Time"
H_EVENT_TYPE = "Cp-Event-Type"
TIMER_ACTOR = "system:timer"

_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_BATCH_DUPLICATE_MSG_ID = 10201


class StoreError(Exception):
    """The log could not be reached or refused the write for a reason other than concurrency."""


class WrongExpectedSequence(Exception):
    """Someone else appended to the aggregate since it was read: reload and decide again."""


class DuplicateAppend(Exception):
    """These message ids were already stored: the command was applied before."""


class RecordedEvent(msgspec.Struct, frozen=True):
    seq: int
    subject: str
    event: AnyEvent
    recorded_at: datetime
    command_id: str | None = None
    actor: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None


class AppendMeta(msgspec.Struct, frozen=True):
    command_id: str
    actor: str
    time: datetime
    correlation_id: str | None = None
    causation_id: str | None = None


class Schedule(msgspec.Struct, frozen=True):
    """Publish ``event`` into ``target`` at ``event.at``; the definition lives on ``subject``."""

    subject: str
    target: str
    event: Event


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JetStreamEventStore:
    def __init__(self, nc: NATS, *, stream: str = STREAM_NAME) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self._direct_get_subject = f"$JS.API.DIRECT.GET.{stream}"

    @classmethod
    async def connect(
        cls, url: str | list[str], *, stream: str = STREAM_NAME, provision: bool = True, **options: Any
    ) -> JetStreamEventStore:
        nc = await nats.connect(url, **{"name": "controlplane", "max_reconnect_attempts": -1, **options})
        require_nats_version(str(nc.connected_server_version))
        store = cls(nc, stream=stream)
        if provision:
            await store.provision()
        return store

    @property
    def nc(self) -> NATS:
        return self._nc

    async def close(self) -> None:
        await self._nc.drain()

    async def provision(self, *, replicas: int = 1) -> None:
        config = StreamConfig(
            name=self.stream,
            subjects=list(STREAM_SUBJECTS),
            storage=StorageType.FILE,
            num_replicas=replicas,
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
            await self._js.update_stream(config)

    async def last_seq(self) -> int:
        info = await self._js.stream_info(self.stream)
        return info.state.last_seq

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
        """Append atomically; returns the stream sequence of each event."""
        if not events:
            raise ValueError("a command must append at least one event")
        messages = [
            (subject, encode_event(event), self._event_headers(event, meta, index, expected_last_seq))
            for index, event in enumerate(events)
        ]
        messages += [(s.subject, encode_event(s.event), self._schedule_headers(s, meta)) for s in schedules]
        if len(messages) == 1:
            last_seq = await self._publish_one(*messages[0])
        else:
            last_seq = await self._publish_batch(messages)
        first_seq = last_seq - len(messages) + 1
        return [first_seq + i for i in range(len(events))]

    @staticmethod
    def _event_headers(event: Event, meta: AppendMeta, index: int, expected_last_seq: int) -> dict[str, str]:
        headers = {
            "Nats-Msg-Id": f"{meta.command_id}:{index}",
            H_COMMAND: meta.command_id,
            H_ACTOR: meta.actor,
            H_TIME: rfc3339(meta.time),
            H_EVENT_TYPE: type(event).__struct_config__.tag,  # type: ignore[attr-defined]
        }
        if index == 0:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_seq)
        if meta.correlation_id:
            headers[H_CORRELATION] = meta.correlation_id
        if meta.causation_id:
            headers[H_CAUSATION] = meta.causation_id
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
            H_EVENT_TYPE: type(schedule.event).__struct_config__.tag,  # type: ignore[attr-defined]
        }
        if meta.correlation_id:
            headers[H_CORRELATION] = meta.correlation_id
        return headers

    async def _publish_one(self, subject: str, payload: bytes, headers: dict[str, str]) -> int:
        try:
            ack = await self._js.publish(subject, payload, headers=headers, stream=self.stream)
        except APIError as exc:
            _raise_for_error(exc.err_code, exc.description or str(exc))
            raise
        except (NatsTimeoutError, NoRespondersError) as exc:
            raise StoreError(f"the log did not acknowledge the append: {exc!r}") from exc
        if ack.duplicate:
            raise DuplicateAppend(headers["Nats-Msg-Id"])
        return ack.seq

    async def _publish_batch(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> int:
        batch_id = messages[0][2].get("Nats-Msg-Id", "batch").replace(":", "-")
        last = len(messages)
        # Messages on one connection arrive in order, so only the commit needs a round trip.
        for number, (subject, payload, headers) in enumerate(messages[:-1], start=1):
            await self._nc.publish(
                subject, payload, headers={**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(number)}
            )
        subject, payload, headers = messages[-1]
        commit = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(last), "Nats-Batch-Commit": "1"}
        try:
            reply = await self._nc.request(subject, payload, headers=commit, timeout=5)
        except (NatsTimeoutError, NoRespondersError) as exc:
            raise StoreError(f"the log did not acknowledge the batch: {exc!r}") from exc
        ack = json.loads(reply.data)
        if "error" in ack:
            _raise_for_error(ack["error"].get("err_code"), ack["error"].get("description", ""))
        return int(ack["seq"])

    async def cancel_schedules(self, subjects: Sequence[str], *, older_than_seq: int) -> None:
        """Remove timer definitions stored before ``older_than_seq``; a newer re-arm survives."""
        for subject in subjects:
            await self._js.purge_stream(self.stream, subject=subject, seq=older_than_seq)

    # --- read -------------------------------------------------------------------------------------

    async def read_subject(self, subject: str, *, after_seq: int = 0) -> list[RecordedEvent]:
        """Every event on ``subject`` after ``after_seq``, in order."""
        recorded: list[RecordedEvent] = []
        next_seq = after_seq + 1
        while True:
            batch, remaining = await self._direct_batch(subject, next_seq)
            recorded.extend(batch)
            if not batch or remaining == 0:
                return recorded
            next_seq = batch[-1].seq + 1

    async def _direct_batch(self, subject: str, start_seq: int) -> tuple[list[RecordedEvent], int]:
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            request = json.dumps({"seq": start_seq, "next_by_subj": subject, "batch": READ_BATCH}).encode()
            await self._nc.publish(self._direct_get_subject, request, reply=inbox)
            batch: list[RecordedEvent] = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=5)
                except NatsTimeoutError as exc:
                    raise StoreError(f"reading {subject} from the log timed out") from exc
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "404":
                    return batch, 0
                if status == "204":
                    return batch, int(headers.get("Nats-Num-Pending", "0"))
                if status:
                    raise StoreError(f"direct get on {subject} failed: {status} {headers.get('Description')}")
                batch.append(recorded_from_message(msg))
        finally:
            await sub.unsubscribe()

    async def read_last(self, subject: str) -> RecordedEvent | None:
        try:
            raw = await self._js.get_last_msg(self.stream, subject, direct=True)
        except NotFoundError:
            return None
        return _recorded(raw.seq, raw.subject, raw.data, raw.headers or {})


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
        command_id=headers.get(H_COMMAND),
        actor=headers.get(H_ACTOR),
        correlation_id=headers.get(H_CORRELATION),
        causation_id=headers.get(H_CAUSATION),
    )


def _parse_time(value: str) -> datetime:
    # The server writes nanoseconds; datetime keeps microseconds.
    if "." in value:
        head, frac = value.rstrip("Z").split(".", 1)
        value = f"{head}.{frac[:6]}+00:00"
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _raise_for_error(err_code: int | None, description: str) -> None:
    if err_code == _ERR_WRONG_LAST_SEQUENCE:
        raise WrongExpectedSequence(description)
    if err_code == _ERR_BATCH_DUPLICATE_MSG_ID:
        raise DuplicateAppend(description)
    raise StoreError(f"the log refused the append: {description} (err_code {err_code})")
