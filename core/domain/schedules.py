"""Schedules (cron): one aggregate per schedule (``cp.<org>.schedule.<id>``). Pure: no I/O, no clock.

A schedule's next fire is a durable timer like every other (``timers``), with one difference: it fires
``ScheduleFired`` into a subject of its own, ``cp.<org>.schedulefire.<id>`` (ADR 0011), because a fire
is work for the scheduler, not history of the schedule. The gateway's scheduler follows those subjects
on a durable consumer. A fire is *due* while the schedule, live and not paused, still names it as its
next fire (``is_due``); the scheduler then records the run (``RecordScheduleRun``) and submits its
task through the submit path (policies, environments) with a task id derived from the schedule, its
generation and the fire time. The decider refuses to record a run for a fire that is not due
(``FireNotDue``): the log's concurrency check makes that decision on the schedule as it is, so a fire
that races a pause or a deletion submits nothing. The recorded run arms the next fire, at the first
cron time after the later of the fire time and the recording's time: after downtime one catch-up run,
never a burst. Next fire times come from the injected ``ctx.now`` or the fire's own time; cron parsing
(cronsim) and time zones (zoneinfo) are pure computation."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from core.domain.commands import (
    Command,
    CreateSchedule,
    DeleteSchedule,
    PauseSchedule,
    RecordScheduleRun,
    ResumeSchedule,
)
from core.domain.decider import Decider, DecisionContext, Timer
from core.domain.errors import AlreadyExists, InvalidCommand, NotFound, Rejected
from core.domain.events import (
    Event,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleFired,
    ScheduleOverlap,
    SchedulePaused,
    ScheduleResumed,
    ScheduleRunOutcome,
    ScheduleRunRecorded,
)

SCHEDULE_AGGREGATE = "schedule"
SCHEDULE_FIRES = "schedulefire"
"""The aggregate type in the subject a schedule's fires land on (``cp.<org>.schedulefire.<id>``): no
decider folds it, only the scheduler reads it."""
SUBMITTING_OUTCOMES: frozenset[str] = frozenset({"submitted", "cancelled_previous"})
OverlapAction = Literal["submit", "skip", "cancel_then_submit"]


class InvalidSchedule(InvalidCommand):
    """A cron expression or time zone that cannot be used."""


class FireNotDue(Rejected):
    """A fire whose schedule has moved on (paused, deleted, recreated, or its run already recorded):
    nothing runs for it."""


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidSchedule(
            f"timezone {timezone!r} is not a known IANA time zone; use a name like UTC or Europe/Paris"
        ) from None


@functools.lru_cache(maxsize=4096)
def check_cron(cron: str, timezone: str) -> None:
    """Raise ``InvalidSchedule`` saying what is wrong with ``cron`` or ``timezone``. Remembers the
    expressions that passed: every fire of a schedule checks its expression again."""
    _zone(timezone)
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise InvalidSchedule(
            f"cron {cron!r} has {len(fields)} fields; give 5 (minute hour day-of-month month day-of-week) "
            "or 6 (second first)"
        )
    try:
        CronSim(cron, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise InvalidSchedule(f"cron {cron!r} is not a valid expression: {exc}") from None


def next_fire(cron: str, timezone: str, after: datetime) -> datetime:
    """The first time ``cron`` names in ``timezone`` strictly after ``after`` (in UTC, whole seconds)."""
    # Cron names whole seconds, so the answer depends on ``after`` only to the second: schedules that
    # share an expression and record their runs within the same second (a burst) parse it once.
    whole_second = after.astimezone(UTC).replace(microsecond=0)
    due = _next_fire_after_second(cron, timezone, whole_second)
    if due is None:
        raise InvalidSchedule(f"cron {cron!r} names no time after {after.isoformat()}")
    return due


@functools.lru_cache(maxsize=4096)
def _next_fire_after_second(cron: str, timezone: str, after: datetime) -> datetime | None:
    check_cron(cron, timezone)
    try:
        return next(CronSim(cron, after.astimezone(_zone(timezone)))).astimezone(UTC)
    except (CronSimError, StopIteration, OverflowError, ValueError):
        return None


def overlap_action(overlap: ScheduleOverlap, *, previous_open: bool) -> OverlapAction:
    """What a fire does, by the schedule's overlap policy, when its previous run is (or is not) open."""
    if not previous_open or overlap == "allow":
        return "submit"
    return "skip" if overlap == "skip" else "cancel_then_submit"


def run_task_id(org: str, schedule_id: str, generation: int, fire_at: datetime) -> str:
    """The task id of a fire: the same fire always submits the same task, so it runs at most once."""
    moment = fire_at.astimezone(UTC).isoformat(timespec="microseconds")
    return hashlib.sha256(f"schedule\x1f{org}\x1f{schedule_id}\x1f{generation}\x1f{moment}".encode()).hexdigest()[:32]


class Schedule(msgspec.Struct, frozen=True):
    id: str
    cron: str
    timezone: str
    task: dict[str, object]
    overlap: ScheduleOverlap
    paused: bool
    generation: int
    created_at: datetime
    updated_at: datetime
    created_by: str
    next_fire_at: datetime | None = None
    """The next cron time the schedule will fire at (null while paused). It stays the fire's time
    until the fire's run is recorded, so a fire is due exactly while it is named here."""
    last_fire_at: datetime | None = None
    last_task_id: str | None = None
    """The task of the latest run that submitted one (what ``skip`` and ``cancel_previous`` look at)."""
    last_outcome: ScheduleRunOutcome | None = None
    last_reason: str | None = None
    runs: int = 0
    """Runs that submitted a task."""
    skipped: int = 0
    deleted: bool = False


ScheduleState = Schedule | None


def is_due(state: ScheduleState, generation: int, at: datetime) -> bool:
    """Whether the fire of ``generation`` at ``at`` is the one the schedule waits for."""
    return (
        state is not None
        and not state.deleted
        and not state.paused
        and state.generation == generation
        and state.next_fire_at == at
    )


def _live(state: ScheduleState, schedule_id: str) -> Schedule:
    if state is None or state.deleted:
        raise NotFound(f"schedule {schedule_id} not found")
    return state


def decide(state: ScheduleState, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    match command:
        case CreateSchedule():
            if state is not None and not state.deleted:
                raise AlreadyExists(f"schedule {command.schedule_id} already exists; delete it first to replace it")
            check_cron(command.cron, command.timezone)
            return [
                ScheduleCreated(
                    at=ctx.now,
                    schedule_id=command.schedule_id,
                    cron=command.cron,
                    timezone=command.timezone,
                    task=command.task,
                    overlap=command.overlap,
                    paused=command.paused,
                    next_fire_at=None if command.paused else next_fire(command.cron, command.timezone, ctx.now),
                    generation=1 if state is None else state.generation + 1,
                    created_by=ctx.actor.id,
                )
            ]
        case PauseSchedule():
            _live(state, command.schedule_id)
            return [SchedulePaused(at=ctx.now, by=ctx.actor.id)]
        case ResumeSchedule():
            schedule = _live(state, command.schedule_id)
            if not schedule.paused and schedule.next_fire_at is not None:
                upcoming = schedule.next_fire_at
            else:
                upcoming = next_fire(schedule.cron, schedule.timezone, ctx.now)
            return [ScheduleResumed(at=ctx.now, by=ctx.actor.id, next_fire_at=upcoming)]
        case DeleteSchedule():
            _live(state, command.schedule_id)
            return [ScheduleDeleted(at=ctx.now, by=ctx.actor.id)]
        case RecordScheduleRun():
            schedule = _live(state, command.schedule_id)
            if command.outcome in SUBMITTING_OUTCOMES and command.task_id is None:
                raise InvalidCommand(f"a run with outcome {command.outcome} names the task it submitted")
            if command.manual:
                if command.generation != schedule.generation:
                    raise FireNotDue(f"schedule {schedule.id} was recreated since this run was triggered")
                upcoming = schedule.next_fire_at
            elif is_due(schedule, command.generation, command.fire_at):
                upcoming = next_fire(schedule.cron, schedule.timezone, max(command.fire_at, ctx.now))
            else:
                raise FireNotDue(
                    f"schedule {schedule.id} no longer waits for its fire at {command.fire_at.isoformat()}"
                )
            return [
                ScheduleRunRecorded(
                    at=ctx.now,
                    fire_at=command.fire_at,
                    task_id=command.task_id,
                    outcome=command.outcome,
                    reason=command.reason,
                    cancelled_task_id=command.cancelled_task_id,
                    manual=command.manual,
                    next_fire_at=upcoming,
                )
            ]
    raise TypeError(f"schedule aggregate does not handle {type(command).__name__}")


def evolve(state: ScheduleState, event: Event) -> ScheduleState:
    match event:
        case ScheduleCreated():
            return Schedule(
                id=event.schedule_id,
                cron=event.cron,
                timezone=event.timezone,
                task=event.task,
                overlap=event.overlap,
                paused=event.paused,
                generation=event.generation,
                created_at=event.at,
                updated_at=event.at,
                created_by=event.created_by,
                next_fire_at=event.next_fire_at,
            )
    if state is None or state.deleted:
        return state
    match event:
        case SchedulePaused():
            return msgspec.structs.replace(state, paused=True, next_fire_at=None, updated_at=event.at)
        case ScheduleResumed():
            return msgspec.structs.replace(state, paused=False, next_fire_at=event.next_fire_at, updated_at=event.at)
        case ScheduleRunRecorded():
            submitted = event.outcome in SUBMITTING_OUTCOMES
            return msgspec.structs.replace(
                state,
                next_fire_at=event.next_fire_at,
                last_fire_at=event.fire_at if state.last_fire_at is None else max(state.last_fire_at, event.fire_at),
                last_task_id=event.task_id if submitted else state.last_task_id,
                last_outcome=event.outcome,
                last_reason=event.reason,
                runs=state.runs + submitted,
                skipped=state.skipped + (event.outcome == "skipped"),
                updated_at=event.at,
            )
        case ScheduleDeleted():
            return msgspec.structs.replace(state, deleted=True, next_fire_at=None, paused=True, updated_at=event.at)
    # ScheduleFired: a fire is work, not history; one found on the schedule's own subject was armed by a
    # release before ADR 0011 and changes nothing (the fire it stood for is armed again on start).
    return state


def timers(state: ScheduleState) -> Sequence[Timer]:
    if state is None or state.deleted or state.paused:
        return ()
    due = state.next_fire_at
    if due is None:
        return ()
    key = f"fire-{state.generation}-{int(due.timestamp())}"
    return [Timer(key, ScheduleFired(at=due, generation=state.generation), into=SCHEDULE_FIRES)]


SCHEDULE = Decider[ScheduleState](
    aggregate=SCHEDULE_AGGREGATE,
    commands=(CreateSchedule, PauseSchedule, ResumeSchedule, DeleteSchedule, RecordScheduleRun),
    initial=None,
    decide=decide,
    evolve=evolve,
    timers=timers,
    aggregate_id=lambda command: command.schedule_id,  # type: ignore[attr-defined]
)
