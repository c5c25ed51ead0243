"""A restarted worker takes its own work back at once. When a worker registers as a new incarnation
(a new process: ``WorkerRegistered.restarted``, decided in core/domain/worker.py), every lease its old process
held is released now (``TaskLeaseReleased`` on each task, caused by the registration) instead of
running out lease by lease: the tasks are pending again, claimable by the new process or any other.

Which leases? Exactly those the worker holds when its registration is appended, found without waiting
for the read model: the tasks projection's rows as of its checkpoint, plus every claim by the worker
the log holds after that checkpoint (on the org's task subjects only). That is a superset of the
leases it holds; the task decider releases only a lease the worker still holds under the registering
credential (a lease is bound to the credential that claimed), and refuses the rest.

A released lease is not a failed attempt of the worker (its circuit breaker does not count it, unlike
an expiry): the process that held it is gone, and the one that registered is new. Counting it would
shut the fresh process out for the breaker's cool-down right when it should take its work back, after
every ``kill -9`` of a busy runner. The task counts the attempt (its retries), which bounds a task that
keeps killing its workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime

import msgspec

from application.idempotency import derived_id
from core.domain.commands import Actor, ReleaseLease
from core.domain.errors import Rejected
from core.domain.events import TaskClaimed, WorkerRegistered
from core.domain.records import RecordedEvent
from core.domain.subjects import EVENTS_PREFIX, parse_aggregate_subject
from core.log.event_store import EventStore
from core.log.handler import CommandHandler, Outcome
from projections.read import DATABASE_UNAVAILABLE, ReadModel

log = logging.getLogger(__name__)

RESTART_REASON = "worker restarted"


class Released(msgspec.Struct, frozen=True):
    """What a registration released: the task ids, and the stream sequence of the last release (0 if
    none), which a reader of the tasks waits for with ``?min_seq=``."""

    task_ids: tuple[str, ...] = ()
    seq: int = 0


def held_leases(snapshot: Mapping[str, str], later: Iterable[RecordedEvent], worker_id: str) -> dict[str, str]:
    """Task id -> the lease ``worker_id`` may hold on it: those a read model ``snapshot`` (taken at or
    after a checkpoint) shows, replaced or joined by each claim of the worker the log holds after that
    checkpoint (``later``, in log order). Every lease the worker holds is among them, with its id: a lease
    claimed up to the checkpoint and still held is in the snapshot, one claimed after it is in ``later``,
    and a later claim of the same task can only come after the earlier lease ended."""
    leases = dict(snapshot)
    for recorded in later:
        event = recorded.event
        if isinstance(event, TaskClaimed) and event.worker_id == worker_id:
            leases[parse_aggregate_subject(recorded.subject).id] = event.lease_id
    return leases


async def release_if_restarted(
    handler: CommandHandler, store: EventStore, read_model: ReadModel, org: str, actor: Actor, registered: Outcome
) -> Released:
    """After a registration (``registered``; a retried one too: releasing is idempotent, so a retry
    finishes what a crash interrupted): if it was a restart, release the leases the worker holds."""
    for recorded in registered.events:
        event = recorded.event
        if isinstance(event, WorkerRegistered) and event.restarted:
            return await _release_held(
                handler, store, read_model, org, actor, event.worker_id, since=event.at, cause=recorded.command_id
            )
    return Released()


async def _release_held(
    handler: CommandHandler,
    store: EventStore,
    read_model: ReadModel,
    org: str,
    actor: Actor,
    worker_id: str,
    *,
    since: datetime,
    cause: str | None,
) -> Released:
    """Release the leases ``worker_id`` took before its registration at ``since``. Without the read
    model nothing is released, and the leases run out as they always did."""
    try:
        checkpoint = await read_model.checkpoint("tasks")
        snapshot = await read_model.leases_held_by(org, worker_id)
    except DATABASE_UNAVAILABLE:
        log.warning("worker %s restarted, but the read model is unreachable: its leases will run out", worker_id)
        return Released()
    later = await store.read_subject(f"{EVENTS_PREFIX}.{org}.task.*", after_seq=checkpoint)

    async def release(task_id: str, lease_id: str) -> Outcome | None:
        command = ReleaseLease(
            task_id=task_id, worker_id=worker_id, lease_id=lease_id, reason=RESTART_REASON, claimed_before=since
        )
        try:
            return await handler.handle(
                org, command, actor=actor, command_id=derived_id(lease_id, "released"), causation_id=cause
            )
        except Rejected:  # not held (any more) under this credential: nothing of this worker's to release
            return None

    candidates = held_leases(snapshot, later, worker_id)
    outcomes = await asyncio.gather(*(release(task_id, lease_id) for task_id, lease_id in candidates.items()))
    released = [outcome for outcome in outcomes if outcome is not None]
    if released:
        log.info("worker %s restarted: released the %d leases its previous process held", worker_id, len(released))
    return Released(tuple(sorted(outcome.state.id for outcome in released)), max((o.seq for o in released), default=0))
