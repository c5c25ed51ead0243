"""The command handler: load the aggregate, decide, append with optimistic concurrency, retry on a
lost race, and arm or cancel the timers the new state needs.

``handle(org, command)`` returns the recorded events, the new state and the last sequence, or raises a
typed ``Rejected``. A command id seen before returns the original outcome and appends nothing."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from core import telemetry
from core.domain.access import API_KEY, ORG
from core.domain.commands import Actor, ClaimTask, Command
from core.domain.decider import Decider, DecisionContext, Timer
from core.domain.environments import ENVIRONMENTS
from core.domain.errors import CommandIdTaken, ConcurrencyExhausted, Rejected
from core.domain.events import Event, encode_event
from core.domain.history import FORK
from core.domain.ids import new_id, validate_token
from core.domain.notifications import NOTIFICATION, NOTIFICATIONS
from core.domain.policy_set import POLICY_SET
from core.domain.queues import QUEUES
from core.domain.records import RecordedEvent
from core.domain.schedules import SCHEDULE
from core.domain.secrets import SECRETS
from core.domain.subjects import aggregate_subject, parse_aggregate_subject, schedule_subject
from core.domain.task_decider import TASK
from core.domain.worker import WORKER
from core.domain.worker_config import WORKER_CONFIG
from core.log.event_store import AppendMeta, DuplicateAppend, EventStore, Schedule, WrongExpectedSequence
from core.lru import Lru

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Outcome(msgspec.Struct, frozen=True):
    events: tuple[RecordedEvent, ...]
    state: Any
    seq: int
    duplicate: bool = False


@dataclass
class _Aggregate:
    """An aggregate as last read: its state, the sequence of its last event, and its history."""

    state: Any
    last_seq: int = 0
    history: list[RecordedEvent] = field(default_factory=list)
    by_command: dict[str, list[int]] = field(default_factory=dict)
    known_at: float = -math.inf
    """When (``time.monotonic``) this copy was last known to be the log's: read, or appended to."""

    def extend(self, decider: Decider[Any], recorded: Sequence[RecordedEvent]) -> None:
        """Fold events read from the log."""
        for item in recorded:
            self._append(item)
            self.state = decider.evolve(self.state, item.event)
        self.known_at = time.monotonic()

    def record(self, recorded: Sequence[RecordedEvent], state_after: Any) -> None:
        """Keep events this process appended, whose fold it has already computed."""
        for item in recorded:
            self._append(item)
        self.state = state_after
        self.known_at = time.monotonic()

    def _append(self, item: RecordedEvent) -> None:
        if item.command_id is not None:
            self.by_command.setdefault(item.command_id, []).append(len(self.history))
        self.history.append(item)
        self.last_seq = item.seq

    def outcome_of(self, decider: Decider[Any], command_id: str) -> Outcome | None:
        positions = self.by_command.get(command_id)
        if not positions:
            return None
        events = tuple(self.history[i] for i in positions)
        state_then = decider.fold(item.event for item in self.history[: positions[-1] + 1])
        return Outcome(events=events, state=state_then, seq=events[-1].seq, duplicate=True)


TRACE_CONTINUED = frozenset({TASK.aggregate})
"""Aggregates whose every command joins the trace of their creation (see ``CommandHandler._traced``)."""

_REMEMBERED_WRITERS = 65_536
"""Actors whose newest write a handler remembers for read-your-writes; the least recent are forgotten
(their reads then wait for nothing, as a reader on another gateway does)."""


class CommandHandler:
    def __init__(
        self,
        store: EventStore,
        *,
        clock: Clock = utc_now,
        deciders: Sequence[Decider[Any]] = (
            TASK,
            WORKER,
            ORG,
            API_KEY,
            POLICY_SET,
            ENVIRONMENTS,
            SCHEDULE,
            WORKER_CONFIG,
            SECRETS,
            NOTIFICATIONS,
            NOTIFICATION,
            QUEUES,
            FORK,  # after TASK: an aggregate named alone (load, rearm) is TASK's, with its timers
        ),
        max_attempts: int = 20,
        cache_size: int = 4096,
        on_commit: Callable[[str, Any, int], None] | None = None,
    ) -> None:
        """``on_commit(subject, new state, seq)`` is told of every command this handler appends, before
        its caller hears of it: an in-process reader of its own writes need not wait for the log."""
        self._store = store
        self._clock = clock
        self._deciders = {command: decider for decider in deciders for command in decider.commands}
        self._max_attempts = max_attempts
        self._cache: OrderedDict[str, _Aggregate] = OrderedDict()
        self._cache_size = cache_size
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._on_commit = on_commit
        self.last_appended_seq = 0
        """The newest stream sequence this handler appended: what a reader of this process's writes
        waits for."""
        self._written_by: Lru[str, int] = Lru(_REMEMBERED_WRITERS)

    def last_write_of(self, actor_id: str) -> int:
        """The sequence of the newest command ``actor_id`` had this handler decide (0 if none it still
        remembers): what that actor's own reads wait for, so a list after a write shows it."""
        return self._written_by.get(actor_id) or 0

    def _wrote(self, actor_id: str, seq: int) -> None:
        self._written_by.put(actor_id, max(seq, self._written_by.get(actor_id) or 0))

    async def handle(
        self,
        org: str,
        command: Command,
        *,
        actor: Actor,
        command_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Outcome:
        """Decide and append ``command``. Without a ``correlation_id`` the events carry the one bound in
        ``core.telemetry`` (the gateway binds each request's X-Request-Id there), if any. With tracing
        on, a span covers the decision and the append; see :meth:`_traced`."""
        if correlation_id is None:
            correlation_id = telemetry.correlation_id.get()
        if telemetry.enabled():
            return await self._traced(org, command, actor, command_id, correlation_id, causation_id)
        return await self._handle(org, command, actor, command_id, correlation_id, causation_id)

    async def _traced(
        self,
        org: str,
        command: Command,
        actor: Actor,
        command_id: str | None,
        correlation_id: str | None,
        causation_id: str | None,
    ) -> Outcome:
        """The command in a span. A command on a task continues the task's trace (the one its submit
        started, whose ``traceparent`` its first event keeps) when it comes from another trace, linking
        the caller's: so a claim, a human's approval or an admin's cancel shows in the task's one trace,
        and the request they came with stays one hop away."""
        decider = self._decider_for(command)
        aggregate_id = decider.aggregate_id(command)
        origin = await self._trace_origin(org, decider, command, actor)
        caller = telemetry.current_traceparent()
        joins = origin is not None and telemetry.trace_id_of(origin) != telemetry.trace_id_of(caller)
        attributes = {
            "cp.org": org,
            "cp.aggregate": decider.aggregate,
            "cp.aggregate_id": aggregate_id,
            "cp.command": type(command).__name__,
            "cp.actor": actor.id,
        }
        with telemetry.span(
            f"command {type(command).__name__}",
            attributes,
            parent=origin if joins else None,
            links=[caller] if joins else (),
            fine=(Rejected,),
            # A claim the gateway lost to another claimer is noise: it tries the next candidate at once.
            dropped=(Rejected,) if isinstance(command, ClaimTask) else (),
        ) as span:
            outcome = await self._handle(org, command, actor, command_id, correlation_id, causation_id)
            telemetry.set_attributes(
                span,
                {
                    "cp.seq": outcome.seq,
                    "cp.events": ",".join(type(item.event).__name__ for item in outcome.events),
                    "cp.duplicate": outcome.duplicate,
                },
            )
            return outcome

    async def _trace_origin(self, org: str, decider: Decider[Any], command: Command, actor: Actor) -> str | None:
        """The ``traceparent`` a command on a task continues: its first event's. Only tasks: a worker or
        an org lives for months, and its heartbeats belong to no one trace. Read from the cache; on a miss
        the aggregate is loaded now (the first attempt would load it anyway), unless the command creates
        it, which has no trace to continue and need not read."""
        if decider.aggregate not in TRACE_CONTINUED:
            return None
        subject = aggregate_subject(org, decider.aggregate, decider.aggregate_id(command))
        cached = self._cache.get(subject)
        if cached is None:
            try:
                decider.decide(decider.initial, command, DecisionContext(org=org, now=self._clock(), actor=actor))
                return None
            except Rejected:
                pass
            async with self._lock(subject):
                cached = await self._load(subject, decider, refresh=True)
        return cached.history[0].traceparent if cached.history else None

    async def origin(self, org: str, aggregate: str, aggregate_id: str) -> RecordedEvent | None:
        """The aggregate's first event (its creation, with the correlation id and ``traceparent`` of the
        request that made it); from the cache when it holds the aggregate, as after a command on it."""
        subject = aggregate_subject(org, aggregate, aggregate_id)
        cached = self._cache.get(subject)
        if cached is None or not cached.history:
            cached = await self._refreshed(org, aggregate, aggregate_id)
        return cached.history[0] if cached.history else None

    async def _handle(
        self,
        org: str,
        command: Command,
        actor: Actor,
        command_id: str | None,
        correlation_id: str | None,
        causation_id: str | None,
    ) -> Outcome:
        decider = self._decider_for(command)
        subject = aggregate_subject(org, decider.aggregate, decider.aggregate_id(command))
        command_id = validate_token(command_id, "command id") if command_id is not None else new_id()
        async with self._lock(subject):
            duplicate = False
            for attempt in range(self._max_attempts):
                now = self._clock()
                context = DecisionContext(org=org, now=now, actor=actor)
                guessed = self._guess_new(subject, decider, command, context) if attempt == 0 else None
                if guessed is not None:
                    aggregate, events = guessed
                else:
                    fresh = attempt > 0 or subject not in self._cache
                    aggregate = await self._load(subject, decider, refresh=attempt > 0)
                    prior = aggregate.outcome_of(decider, command_id)
                    if prior is not None:
                        self._wrote(actor.id, prior.seq)
                        return prior
                    if duplicate:
                        raise CommandIdTaken(
                            f"command id {command_id} already names another command, not one on {subject}: "
                            "send this one with a new Idempotency-Key"
                        )
                    try:
                        events = decider.decide(aggregate.state, command, context)
                    except Rejected:
                        if fresh:
                            raise
                        continue  # refused by a cached state (a timer may have fired since): read, decide again
                new_state = decider.fold(events, aggregate.state)
                armed, cancelled = _timer_changes(decider, aggregate.state, new_state, subject)
                traceparent = telemetry.current_traceparent()
                meta = AppendMeta(command_id, actor.id, now, correlation_id, causation_id, traceparent)
                try:
                    seqs = await self._store.append(
                        subject, events, expected_last_seq=aggregate.last_seq, meta=meta, schedules=armed
                    )
                except (WrongExpectedSequence, DuplicateAppend) as refused:
                    # A duplicate whose outcome the subject, read again, does not hold was another command's.
                    duplicate = isinstance(refused, DuplicateAppend)
                    await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                    continue
                recorded = tuple(
                    RecordedEvent(
                        seq=seq,
                        subject=subject,
                        event=event,
                        recorded_at=now,
                        command_id=command_id,
                        actor=actor.id,
                        correlation_id=correlation_id,
                        causation_id=causation_id,
                        traceparent=traceparent,
                    )
                    for seq, event in zip(seqs, events, strict=True)
                )
                self.last_appended_seq = max(self.last_appended_seq, seqs[-1])
                self._wrote(actor.id, seqs[-1])
                aggregate.record(recorded, new_state)
                self._remember(subject, aggregate)
                if self._on_commit is not None:
                    self._on_commit(subject, aggregate.state, seqs[-1])
                if cancelled:
                    await self._retire(cancelled, older_than_seq=seqs[-1] + 1)
                return Outcome(events=recorded, state=aggregate.state, seq=seqs[-1])
        raise ConcurrencyExhausted(f"{subject} kept changing; {self._max_attempts} attempts lost the race")

    def cached_state(self, org: str, aggregate: str, aggregate_id: str) -> Any:
        """The aggregate's state as this handler last saw it (None if it holds none), without I/O: for a
        caller that may act on a slightly old state to skip a command that would change nothing."""
        cached = self._cache.get(aggregate_subject(org, aggregate, aggregate_id))
        return None if cached is None else cached.state

    async def load(self, org: str, aggregate: str, aggregate_id: str, *, max_age: float = 0.0) -> tuple[Any, int]:
        """The current state of an aggregate and the sequence of its last event (0 if it has none). With
        ``max_age`` (seconds), a copy this handler read or wrote that recently is answered without
        reading the log: for a read that may be that stale, as other processes' writes go."""
        cached = self._cache.get(aggregate_subject(org, aggregate, aggregate_id))
        if max_age > 0 and cached is not None and time.monotonic() - cached.known_at <= max_age:
            return cached.state, cached.last_seq
        loaded = await self._refreshed(org, aggregate, aggregate_id)
        return loaded.state, loaded.last_seq

    async def outcome_of(
        self, org: str, aggregate: str, aggregate_id: str, command_id: str, *, refresh: bool = True
    ) -> Outcome | None:
        """What the command ``command_id`` recorded on the aggregate, as the log holds it now (None if it
        recorded nothing there): for a process finishing what an earlier attempt at that command began.
        ``refresh=False``: as this handler last read it, for a caller that has just read it."""
        decider = self._decider_named(aggregate)
        subject = aggregate_subject(org, aggregate, aggregate_id)
        async with self._lock(subject):
            return (await self._load(subject, decider, refresh=refresh)).outcome_of(decider, command_id)

    async def history(self, org: str, aggregate: str, aggregate_id: str) -> list[RecordedEvent]:
        return list((await self._refreshed(org, aggregate, aggregate_id)).history)

    async def rearm(self, org: str, aggregate: str, aggregate_id: str, *, actor: str) -> list[str]:
        """Arm again every timer the aggregate's state, folded from the log, wants and the log does not
        hold: what an arming that failed after its commit (or a stream restored from a backup) left
        out. Returns the schedule subjects armed. A timer armed twice fires twice; the second folds
        as a no-op, like any timer whose guarded thing has moved on."""
        decider = self._decider_named(aggregate)
        subject = aggregate_subject(org, aggregate, aggregate_id)
        async with self._lock(subject):
            loaded = await self._load(subject, decider, refresh=True)
            wanted = [timer_schedule(subject, timer) for timer in decider.timers(loaded.state)]
            missing = [schedule for schedule in wanted if not await self._store.holds(schedule.subject)]
            if missing:
                await self._store.arm(missing, AppendMeta(command_id=new_id(), actor=actor, time=self._clock()))
        return [schedule.subject for schedule in missing]

    async def _refreshed(self, org: str, aggregate: str, aggregate_id: str) -> _Aggregate:
        decider = self._decider_named(aggregate)
        subject = aggregate_subject(org, aggregate, aggregate_id)
        async with self._lock(subject):
            return await self._load(subject, decider, refresh=True)

    def _decider_named(self, aggregate: str) -> Decider[Any]:
        decider = next((d for d in self._deciders.values() if d.aggregate == aggregate), None)
        if decider is None:
            raise ValueError(f"unknown aggregate type {aggregate!r}")
        return decider

    def _lock(self, subject: str) -> asyncio.Lock:
        """One in-process writer per aggregate spares lost races; across processes OCC decides."""
        lock = self._locks.get(subject)
        if lock is None:
            lock = self._locks[subject] = asyncio.Lock()
        return lock

    def _decider_for(self, command: Command) -> Decider[Any]:
        try:
            return self._deciders[type(command)]
        except KeyError:
            raise TypeError(f"no aggregate handles {type(command).__name__}") from None

    def _guess_new(
        self, subject: str, decider: Decider[Any], command: Command, context: DecisionContext
    ) -> tuple[_Aggregate, Sequence[Event]] | None:
        """On a cache miss, a command that the empty aggregate accepts (a submit, a registration) is
        appended expecting an empty subject: the log's concurrency check proves it new, or we read and
        decide again. That saves a read on every creation. A refusal is never based on the guess."""
        if subject in self._cache:
            return None
        try:
            return _Aggregate(state=decider.initial), decider.decide(decider.initial, command, context)
        except Rejected:
            return None

    async def _load(self, subject: str, decider: Decider[Any], *, refresh: bool) -> _Aggregate:
        cached = self._cache.get(subject)
        if cached is None:
            cached = _Aggregate(state=decider.initial)
            refresh = True
        if refresh:
            cached.extend(decider, await self._store.read_subject(subject, after_seq=cached.last_seq))
        self._remember(subject, cached)
        return cached

    def _remember(self, subject: str, aggregate: _Aggregate) -> None:
        self._cache[subject] = aggregate
        self._cache.move_to_end(subject)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _retire(self, subjects: list[str], *, older_than_seq: int) -> None:
        """Timers the committed state no longer wants: asked to go, without waiting for the log's answer."""
        try:
            await self._store.cancel_schedules(subjects, older_than_seq=older_than_seq)
        except Exception:  # a timer that still fires folds as a no-op
            log.warning("could not cancel timers %s", subjects, exc_info=True)


def _timer_changes(decider: Decider[Any], before: Any, after: Any, subject: str) -> tuple[list[Schedule], list[str]]:
    old = {timer_subject(subject, timer): timer for timer in decider.timers(before)}
    new = {timer_subject(subject, timer): timer for timer in decider.timers(after)}
    armed = [timer_schedule(subject, timer, s) for s, timer in new.items() if s not in old]
    return armed, [s for s in old if s not in new]


def timer_schedule(subject: str, timer: Timer, definition: str | None = None) -> Schedule:
    """What the log stores for ``timer`` of the aggregate on ``subject``: its definition's subject and
    where it fires (the aggregate's own subject, or the one its ``into`` names)."""
    target = subject
    if timer.into is not None:
        address = parse_aggregate_subject(subject)
        target = aggregate_subject(address.org, timer.into, address.id)
    return Schedule(subject=definition or timer_subject(subject, timer), target=target, event=timer.event)


def timer_subject(subject: str, timer: Timer) -> str:
    """One schedule subject per distinct timer: a racing command can never overwrite the timer of the
    command that won, because equal subjects mean equal timers (where a timer fires is part of it)."""
    identity = encode_event(timer.event) + (timer.into or "").encode()
    digest = hashlib.blake2b(identity, digest_size=6).hexdigest()
    return schedule_subject(subject, f"{timer.key}-{digest}")
