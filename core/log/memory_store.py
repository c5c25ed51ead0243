"""An ``EventStore`` in memory, for fast tests of the command handler's rules without a nats-server.

It keeps the contract of ``core.log.store.JetStreamEventStore`` as nats-server enforces it: one global
sequence across subjects (timer definitions take one too), per-subject optimistic concurrency, message
id deduplication within the duplicate window (a single event is checked for concurrency first, a batch
for duplicates first), NATS subject filters, purges, and timers that fire into their target as
``system:timer``. It does no I/O and reads no clock: time comes from ``AppendMeta.time`` and from the
``now`` a test passes to :meth:`InMemoryEventStore.fire_due`. What it leaves out: the server's message
size limit (no :class:`~core.log.event_store.EventTooLarge`) and the timing of real timers.

Tests can also make the log misbehave: :meth:`~InMemoryEventStore.fail_next_append` refuses an append
(or loses its acknowledgement after storing it), :meth:`~InMemoryEventStore.before_next_append` lets a
competing writer append just before the handler's append is checked."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec

from core.domain.events import Event, decode_event, encode_event
from core.domain.records import RecordedEvent
from core.domain.subjects import STREAM_SUBJECTS
from core.log.event_store import (
    DUPLICATE_WINDOW_SECONDS,
    TIMER_ACTOR,
    AppendMeta,
    DuplicateAppend,
    Schedule,
    StoreError,
    WrongExpectedSequence,
)

AppendHook = Callable[[str], Awaitable[None]]
"""Called with the subject of the append it runs before."""


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject-filter matching: ``*`` is exactly one token, a final ``>`` one or more."""
    wanted = pattern.split(".")
    if "" in wanted or ">" in wanted[:-1]:
        raise StoreError(f"invalid subject filter {pattern!r}")
    tokens = subject.split(".")
    if wanted[-1] == ">":
        return len(tokens) >= len(wanted) and _tokens_match(wanted[:-1], tokens[: len(wanted) - 1])
    return len(tokens) == len(wanted) and _tokens_match(wanted, tokens)


def _tokens_match(wanted: Sequence[str], tokens: Sequence[str]) -> bool:
    return all(want in ("*", token) for want, token in zip(wanted, tokens, strict=True))


def _as_logged(moment: datetime) -> datetime:
    """A time as the log gives it back: UTC, to the millisecond (the adapter's ``Cp-Time`` header)."""
    utc = moment.astimezone(UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def _as_stored(event: Event) -> Event:
    """The event as a reader of the log decodes it, so nothing that would not survive encoding passes."""
    return decode_event(encode_event(event))


@dataclass(frozen=True)
class _Fault:
    error: Exception
    after_storing: bool


class InMemoryEventStore:
    """Implements :class:`core.log.event_store.EventStore`. Not shared across processes, so every race it
    sees is one a test stages: two handlers on one store, or a hook of :meth:`before_next_append`."""

    def __init__(self, *, duplicate_window: timedelta = timedelta(seconds=DUPLICATE_WINDOW_SECONDS)) -> None:
        self._messages: dict[int, RecordedEvent] = {}
        """Every stored message by sequence; inserted in sequence order, so iteration is log order."""
        self._targets: dict[int, str] = {}
        """The subject each stored timer definition (by its sequence) fires into."""
        self._last_seq = 0
        self._stored_ids: dict[str, datetime] = {}
        self._duplicate_window = duplicate_window
        self._hooks: deque[AppendHook] = deque()
        self._faults: deque[_Fault] = deque()
        self._in_hook = False
        self.appends_tried = 0
        """Calls of :meth:`append` (a hook's own appends aside): how many attempts a handler made."""

    # --- fault injection --------------------------------------------------------------------------

    def fail_next_append(self, error: Exception, *, after_storing: bool = False) -> None:
        """The next append raises ``error`` and stores nothing. With ``after_storing`` the next append
        that the log accepts stores its events and then raises, as when the log commits a command and
        its acknowledgement is lost (appends refused before it do not use the fault up)."""
        self._faults.append(_Fault(error, after_storing))

    def before_next_append(self, hook: AppendHook, *, times: int = 1) -> None:
        """Await ``hook(subject)`` right before each of the next ``times`` appends is checked: a
        competing writer that wins the race. Appends made while a hook runs are not hooked or faulted."""
        self._hooks.extend([hook] * times)

    def clear_injected(self) -> None:
        """Forget the faults and hooks no append has used: a command refused before it appended."""
        self._faults.clear()
        self._hooks.clear()

    # --- EventStore -------------------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        events: Sequence[Event],
        *,
        expected_last_seq: int,
        meta: AppendMeta,
        schedules: Sequence[Schedule] = (),
    ) -> list[int]:
        if not events:
            raise ValueError("a command must append at least one event")
        fault = None
        if not self._in_hook:
            self.appends_tried += 1
            if self._hooks:
                hook = self._hooks.popleft()
                self._in_hook = True
                try:
                    await hook(subject)
                finally:
                    self._in_hook = False
            fault = self._faults[0] if self._faults else None
            if fault is not None and not fault.after_storing:
                self._faults.popleft()
                raise fault.error
        for target in (subject, *(schedule.subject for schedule in schedules)):
            self._check_in_stream(target)
        # As the adapter does: the timer definitions go first, and are purged again when the append
        # fails (with whatever their subjects held before them, as its purge does); also when only the
        # acknowledgement was lost, which it cannot tell from a refusal: `timers reconcile` re-arms those.
        armed = [self._store_schedule(schedule, meta) for schedule in schedules]
        try:
            seqs = self._store_events(subject, events, expected_last_seq, meta)
            if fault is not None:
                self._faults.popleft()
                raise fault.error
        except BaseException:
            for schedule, seq in zip(schedules, armed, strict=True):
                self._purge(schedule.subject, before_seq=seq + 1)
            raise
        return seqs

    async def read_subject(self, subject: str, *, after_seq: int = 0) -> list[RecordedEvent]:
        return [
            message
            for seq, message in self._messages.items()
            if seq > after_seq and subject_matches(subject, message.subject)
        ]

    async def cancel_schedules(self, subjects: Sequence[str], *, older_than_seq: int) -> None:
        for subject in subjects:
            self._purge(subject, before_seq=older_than_seq)

    async def holds(self, subject: str) -> bool:
        return any(subject_matches(subject, message.subject) for message in self._messages.values())

    async def arm(self, schedules: Sequence[Schedule], meta: AppendMeta) -> None:
        for schedule in schedules:
            self._check_in_stream(schedule.subject)
        for schedule in schedules:
            self._store_schedule(schedule, meta)

    # --- beyond the protocol ----------------------------------------------------------------------

    async def last_seq(self) -> int:
        """The newest sequence the log gave out (purged messages keep theirs), as the adapter's."""
        return self._last_seq

    def fire_due(self, now: datetime) -> list[int]:
        """Fire every armed timer whose ``event.at`` is not after ``now``, earliest first: its event is
        stored on its target subject under a new sequence, as ``system:timer`` with the arming
        command's id as causation, and its definition removed. Returns the fired events' sequences."""
        due = sorted(
            (seq for seq in self._targets if self._messages[seq].event.at <= now),
            key=lambda seq: (self._messages[seq].event.at, seq),
        )
        fired: list[int] = []
        for seq in due:
            definition = self._messages.pop(seq)
            fired.append(self._store(msgspec.structs.replace(definition, subject=self._targets.pop(seq))))
        return fired

    # --- internals --------------------------------------------------------------------------------

    def _store_events(
        self, subject: str, events: Sequence[Event], expected_last_seq: int, meta: AppendMeta
    ) -> list[int]:
        message_ids = [f"{meta.command_id}:{index}" for index in range(len(events))]
        # nats-server checks a single message's expected sequence before its id, and an atomic batch's
        # ids before its expected sequence: a retry can hear either refusal.
        if len(events) == 1:
            self._check_expected(subject, expected_last_seq)
            self._check_new(message_ids, meta.time)
        else:
            self._check_new(message_ids, meta.time)
            self._check_expected(subject, expected_last_seq)
        for message_id in message_ids:
            self._stored_ids[message_id] = meta.time
        return [
            self._store(
                RecordedEvent(
                    seq=0,
                    subject=subject,
                    event=_as_stored(event),
                    recorded_at=_as_logged(meta.time),
                    command_id=meta.command_id,
                    actor=meta.actor,
                    correlation_id=meta.correlation_id or None,
                    causation_id=meta.causation_id or None,
                    traceparent=meta.traceparent or None,
                )
            )
            for event in events
        ]

    def _store_schedule(self, schedule: Schedule, meta: AppendMeta) -> int:
        """A timer definition carries what its fired event will: the timer actor, no command id (it is
        no part of the arming command), that command as its causation, and ``event.at`` as its time."""
        seq = self._store(
            RecordedEvent(
                seq=0,
                subject=schedule.subject,
                event=_as_stored(schedule.event),
                recorded_at=_as_logged(schedule.event.at),
                command_id=None,
                actor=TIMER_ACTOR,
                correlation_id=meta.correlation_id or None,
                causation_id=meta.command_id,
                traceparent=meta.traceparent or None,
            )
        )
        self._targets[seq] = schedule.target
        return seq

    def _store(self, message: RecordedEvent) -> int:
        self._last_seq += 1
        self._messages[self._last_seq] = msgspec.structs.replace(message, seq=self._last_seq)
        return self._last_seq

    def _purge(self, subject: str, *, before_seq: int) -> None:
        for seq in [s for s, m in self._messages.items() if s < before_seq and subject_matches(subject, m.subject)]:
            del self._messages[seq]
            self._targets.pop(seq, None)

    def _check_expected(self, subject: str, expected_last_seq: int) -> None:
        last = max((seq for seq, m in self._messages.items() if m.subject == subject), default=0)
        if last != expected_last_seq:
            raise WrongExpectedSequence(f"wrong last sequence: {last}")

    def _check_new(self, message_ids: Sequence[str], now: datetime) -> None:
        for message_id in message_ids:
            stored_at = self._stored_ids.get(message_id)
            if stored_at is not None and now - stored_at < self._duplicate_window:
                raise DuplicateAppend(message_id)

    @staticmethod
    def _check_in_stream(subject: str) -> None:
        if not any(subject_matches(pattern, subject) for pattern in STREAM_SUBJECTS):
            raise StoreError(f"no stream takes subject {subject!r}")
