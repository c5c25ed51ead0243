"""What the command handler needs of a log, independent of NATS: the ``EventStore`` protocol, the append
metadata, and the ways an append can be refused. The record type it reads back is
:class:`core.domain.records.RecordedEvent`: history folding, in the domain, reads it too.

``core.log.store.JetStreamEventStore`` is the production adapter; ``core.log.memory_store.InMemoryEventStore``
implements the same contract without I/O, for fast tests of the handler's rules."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import msgspec

from core.domain.events import Event
from core.domain.records import RecordedEvent

DUPLICATE_WINDOW_SECONDS = 120.0
"""How long a stored message id makes a re-append of it a duplicate."""

TIMER_ACTOR = "system:timer"
"""The actor of an event a timer fired (it has no command id: it belongs to no command)."""


class StoreError(Exception):
    """The log could not be reached or refused the write for a reason other than concurrency."""


class EventTooLarge(StoreError):
    """An event, with its headers, would exceed the server's message size limit. Checked before
    anything is published: the server answers such a message by closing the connection."""


class WrongExpectedSequence(Exception):
    """Someone else appended to the aggregate since it was read: reload and decide again."""


class DuplicateAppend(Exception):
    """These message ids were already stored: the command was applied before."""


class AppendMeta(msgspec.Struct, frozen=True):
    command_id: str
    actor: str
    time: datetime
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None


class Schedule(msgspec.Struct, frozen=True):
    """Publish ``event`` into ``target`` at ``event.at``; the definition lives on ``subject``."""

    subject: str
    target: str
    event: Event


class EventStore(Protocol):
    """One log of every org's events: a global sequence across subjects, per-subject optimistic
    concurrency, message-id deduplication and durable timers.

    Every stored message (an event or a timer definition) takes the next global sequence. The events
    of an append get the message ids ``<command id>:<index>``; a timer definition and the event it
    fires get none, so a fired event carries ``command_id=None``, actor :data:`TIMER_ACTOR` and the
    arming command's id as its ``causation_id``."""

    async def append(
        self,
        subject: str,
        events: Sequence[Event],
        *,
        expected_last_seq: int,
        meta: AppendMeta,
        schedules: Sequence[Schedule] = (),
    ) -> list[int]:
        """Store a command's events on ``subject`` (all or none) and the timer definitions they arm;
        returns the events' sequences, consecutive and in order.

        Raises :class:`WrongExpectedSequence` when ``subject``'s last stored sequence (0 if it holds
        none) is not ``expected_last_seq``, and :class:`DuplicateAppend` when a message id is already
        stored (within :data:`DUPLICATE_WINDOW_SECONDS`, on any subject): a retry of a command that was
        applied before. A single event is checked for concurrency first, several for duplicates first,
        as nats-server does. When the append fails the timer definitions are purged again, with what
        their subjects held before them (also when only the acknowledgement was lost: that cannot be
        told from a refusal, and ``CommandHandler.rearm`` restores them). ``ValueError`` for no events;
        :class:`EventTooLarge` or another :class:`StoreError` when the log cannot take them."""
        ...

    async def read_subject(self, subject: str, *, after_seq: int = 0) -> list[RecordedEvent]:
        """Every message on ``subject`` after ``after_seq``, in sequence order. ``subject`` may be a NATS
        filter: ``*`` matches one token, a final ``>`` one or more (``cp.<org>.>`` reads an org)."""
        ...

    async def cancel_schedules(self, subjects: Sequence[str], *, older_than_seq: int) -> None:
        """Remove the messages on each of ``subjects`` stored before ``older_than_seq``: a timer armed
        again after that survives. The removal may take effect after this returns, or not at all (the
        log's answer is not awaited): a timer definition left behind fires as a no-op."""
        ...

    async def holds(self, subject: str) -> bool:
        """Whether a message is stored on ``subject`` (for a timer definition: armed and not yet fired)."""
        ...

    async def arm(self, schedules: Sequence[Schedule], meta: AppendMeta) -> None:
        """Store timer definitions outside a command: how lost timers are armed again."""
        ...
