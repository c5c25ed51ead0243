"""The worker aggregate: registration, heartbeats and liveness. Pure: no I/O, no clock.

A worker that misses heartbeats for ``heartbeat_timeout_seconds`` goes ``offline`` through a durable
timer re-armed by every heartbeat, so liveness needs no sweeper process."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import msgspec

from core.commands import Command, DeregisterWorker, HeartbeatWorker, RegisterWorker, ReportWorkerFailure
from core.decider import Decider, DecisionContext, Timer
from core.errors import NotFound
from core.events import (
    Event,
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
    raise TypeError(f"worker aggregate does not handle {type(command).__name__}")


def evolve(state: WorkerState, event: Event) -> WorkerState:
    match event:
        case WorkerRegistered():
            return Worker(
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
            )
        case WorkerHeartbeat() if state is not None:
            return msgspec.structs.replace(state, status=event.status, last_heartbeat_at=event.at, failure_reason=None)
        case WorkerHeartbeatMissed() if any(timer.event == event for timer in timers(state)):
            return msgspec.structs.replace(state, status="offline")
        case WorkerFailed() if state is not None:
            return msgspec.structs.replace(state, status="failed", failure_reason=event.reason)
        case WorkerDeregistered():
            return None
    return state


def timers(state: WorkerState) -> Sequence[Timer]:
    if state is None or state.status in ("offline", "failed"):
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
    commands=(RegisterWorker, HeartbeatWorker, ReportWorkerFailure, DeregisterWorker),
    initial=None,
    decide=decide,
    evolve=evolve,
    timers=timers,
    aggregate_id=lambda command: command.worker_id,  # type: ignore[attr-defined]
)
