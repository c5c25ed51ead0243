"""The worker aggregate: registration, heartbeats and liveness. Pure: no I/O, no clock.

A worker that misses heartbeats for ``heartbeat_timeout_seconds`` goes ``offline`` through a durable
timer re-armed by every heartbeat, so liveness needs no sweeper process.

Circuit breaker: 3 consecutive failed attempts (non-retryable failure, lease expiry; the gateway
records each from the task's events) open it: the worker is ``failed`` and the gateway offers it
nothing until 60 s pass (a durable timer closes it) or an admin resets it (the defaults,
``core.domain.commands.DEFAULT_BREAKER_*``). A completed attempt resets the count. A queue may set
other values for its workers (``core.domain.queues``); the gateway then passes them with each attempt it records.

Incarnations: each worker process names itself with a token of its own when it registers. A
registration whose incarnation differs from the recorded one comes from a new process: the event says
``restarted`` and the gateway releases the leases the old process held (``TaskLeaseReleased`` on each
task), so its tasks go back to be claimed at once instead of when each lease runs out. A registration
without an incarnation names no process: it releases nothing and keeps the recorded one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import msgspec

from core.domain.commands import (
    Command,
    DeregisterWorker,
    HeartbeatWorker,
    RecordWorkerAttempt,
    RegisterWorker,
    ReportWorkerFailure,
    ResetWorkerBreaker,
)
from core.domain.decider import Decider, DecisionContext, Timer
from core.domain.errors import InvalidTransition, NotFound
from core.domain.events import (
    Event,
    WorkerAttemptFailed,
    WorkerAttemptSucceeded,
    WorkerBreakerOpened,
    WorkerBreakerReset,
    WorkerDeregistered,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerHeartbeatMissed,
    WorkerRegistered,
    WorkerStatus,
)


class Worker(msgspec.Struct, frozen=True):
    id: str
    queue: str
    capabilities: tuple[str, ...]
    labels: dict[str, str]
    model: str | None
    provider: str | None
    status: WorkerStatus
    heartbeat_timeout_seconds: float
    registered_at: datetime
    last_heartbeat_at: datetime
    registrations: int
    failure_reason: str | None = None
    consecutive_failures: int = 0
    """Failed attempts since the last success (or the last breaker reset)."""
    breaker_open_until: datetime | None = None
    """Set while the circuit breaker is open: the worker is ``failed`` and offered nothing."""
    breaker_trips: int = 0
    """How many times the breaker opened: names its reset timer."""
    incarnation: str | None = None
    """The token of the process that last registered the worker with one (None: none ever did)."""

    def breaker_open(self, now: datetime) -> bool:
        return self.breaker_open_until is not None and now < self.breaker_open_until


WorkerState = Worker | None


def decide(state: WorkerState, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    if isinstance(command, RegisterWorker):
        return [
            WorkerRegistered(
                at=ctx.now,
                worker_id=command.worker_id,
                queue=command.queue,
                capabilities=tuple(sorted(set(command.capabilities))),
                labels=command.labels,
                model=command.model,
                provider=command.provider,
                heartbeat_timeout_seconds=command.heartbeat_timeout_seconds,
                incarnation=command.incarnation,
                restarted=is_restart(state, command.incarnation),
            )
        ]
    if state is None:
        raise NotFound(f"worker {getattr(command, 'worker_id', '?')} is not registered; register it first")
    match command:
        case HeartbeatWorker():
            return [WorkerHeartbeat(at=ctx.now, status=command.status)]  # type: ignore[arg-type]
        case ReportWorkerFailure():
            return [WorkerFailed(at=ctx.now, reason=command.reason)]
        case DeregisterWorker():
            return [WorkerDeregistered(at=ctx.now)]
        case RecordWorkerAttempt():
            return _attempt(state, command, ctx)
        case ResetWorkerBreaker():
            if state.breaker_open_until is None:
                raise InvalidTransition(f"worker {state.id}'s circuit breaker is not open")
            return [WorkerBreakerReset(at=ctx.now, until=state.breaker_open_until, by=ctx.actor.id)]
    raise TypeError(f"worker aggregate does not handle {type(command).__name__}")


def is_restart(state: WorkerState, incarnation: str | None) -> bool:
    """A registration naming ``incarnation`` comes from another process than the one the worker last
    knew: the worker exists and recorded another incarnation, or none (its earlier registrations named
    no process, and a process names itself in every registration or in none). A same-process
    re-registration (after a network blip, say) is not one; neither is a first registration."""
    return state is not None and incarnation is not None and incarnation != state.incarnation


def _attempt(state: Worker, command: RecordWorkerAttempt, ctx: DecisionContext) -> Sequence[Event]:
    if command.outcome == "succeeded":
        if state.consecutive_failures == 0:
            raise InvalidTransition(f"worker {state.id} has no failed attempts to reset")
        return [WorkerAttemptSucceeded(at=ctx.now, task_id=command.task_id)]
    failed = WorkerAttemptFailed(at=ctx.now, task_id=command.task_id, reason=command.outcome)  # type: ignore[arg-type]
    failures = state.consecutive_failures + 1
    if state.breaker_open_until is not None or failures < command.breaker_failures:
        return [failed]
    until = ctx.now + timedelta(seconds=command.breaker_cooldown_seconds)
    return [failed, WorkerBreakerOpened(at=ctx.now, failures=failures, until=until)]


def evolve(state: WorkerState, event: Event) -> WorkerState:
    match event:
        case WorkerRegistered():
            fresh = Worker(
                id=event.worker_id,
                queue=event.queue,
                capabilities=event.capabilities,
                labels=event.labels,
                model=event.model,
                provider=event.provider,
                status="starting",
                heartbeat_timeout_seconds=event.heartbeat_timeout_seconds,
                registered_at=event.at,
                last_heartbeat_at=event.at,
                registrations=(state.registrations if state else 0) + 1,
                # Registering again does not close an open breaker nor forget failures.
                consecutive_failures=state.consecutive_failures if state else 0,
                breaker_open_until=state.breaker_open_until if state else None,
                breaker_trips=state.breaker_trips if state else 0,
                incarnation=event.incarnation or (state.incarnation if state else None),
            )
            if state is not None and state.breaker_open_until is not None:
                return msgspec.structs.replace(fresh, status="failed", failure_reason=state.failure_reason)
            return fresh
        case WorkerHeartbeat() if state is not None and state.breaker_open_until is not None:
            return msgspec.structs.replace(state, last_heartbeat_at=event.at)  # stays failed while open
        case WorkerHeartbeat() if state is not None:
            return msgspec.structs.replace(state, status=event.status, last_heartbeat_at=event.at, failure_reason=None)
        case WorkerHeartbeatMissed() if any(timer.event == event for timer in timers(state)):
            return msgspec.structs.replace(state, status="offline")
        case WorkerFailed() if state is not None:
            return msgspec.structs.replace(state, status="failed", failure_reason=event.reason)
        case WorkerDeregistered():
            return None
        case WorkerAttemptFailed() if state is not None:
            return msgspec.structs.replace(state, consecutive_failures=state.consecutive_failures + 1)
        case WorkerAttemptSucceeded() if state is not None:
            return msgspec.structs.replace(state, consecutive_failures=0)
        case WorkerBreakerOpened() if state is not None:
            return msgspec.structs.replace(
                state,
                status="failed",
                failure_reason=f"circuit breaker: {event.failures} consecutive failed attempts",
                breaker_open_until=event.until,
                breaker_trips=state.breaker_trips + 1,
            )
        case WorkerBreakerReset() if state is not None and state.breaker_open_until == event.until:
            return msgspec.structs.replace(
                state, status="ready", failure_reason=None, breaker_open_until=None, consecutive_failures=0
            )
    return state


def timers(state: WorkerState) -> Sequence[Timer]:
    if state is None:
        return ()
    if state.breaker_open_until is not None:
        reset = WorkerBreakerReset(at=state.breaker_open_until, until=state.breaker_open_until)
        return [Timer(f"breaker-{state.breaker_trips}", reset)]
    if state.status in ("offline", "failed"):
        return ()
    due = state.last_heartbeat_at + timedelta(seconds=state.heartbeat_timeout_seconds)
    return [
        Timer(
            f"liveness-{state.registrations}",
            WorkerHeartbeatMissed(at=due, last_heartbeat_at=state.last_heartbeat_at),
        )
    ]


WORKER = Decider[WorkerState](
    aggregate="worker",
    commands=(
        RegisterWorker,
        HeartbeatWorker,
        ReportWorkerFailure,
        DeregisterWorker,
        RecordWorkerAttempt,
        ResetWorkerBreaker,
    ),
    initial=None,
    decide=decide,
    evolve=evolve,
    timers=timers,
    aggregate_id=lambda command: command.worker_id,  # type: ignore[attr-defined]
)
