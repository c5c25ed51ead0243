"""Workers' circuit breakers, as the application drives them: it records on the worker aggregate how
each attempt ended (from the task's events: completions and failures, and the claim index's lease
expiries) and refuses to offer tasks to a worker whose breaker is open.

An attempt is recorded with the command id ``attempt-<task id>-<seq of the task event>``: every
gateway following the log may report the same lease expiry, and the log keeps it once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from application.queues import settings_of
from core.domain.commands import SYSTEM, RecordWorkerAttempt
from core.domain.errors import Rejected
from core.domain.events import TaskCompleted, TaskFailed
from core.domain.worker import Worker
from core.log.handler import CommandHandler, Outcome

log = logging.getLogger(__name__)


async def record_attempt(
    handler: CommandHandler, org: str, worker_id: str, task_id: str, outcome: str, seq: int
) -> None:
    """Tell worker ``worker_id`` how its attempt at ``task_id`` ended, with its queue's breaker settings.
    A worker id that names no registered worker (or a success with no failures to forget) records nothing."""
    worker, _ = await handler.load(org, "worker", worker_id, max_age=BREAKER_STALENESS_SECONDS)
    if not isinstance(worker, Worker):
        return
    settings = await settings_of(handler, org, worker.queue)
    command = RecordWorkerAttempt(
        worker_id=worker_id,
        task_id=task_id,
        outcome=outcome,
        breaker_failures=settings.breaker_failures,
        breaker_cooldown_seconds=settings.breaker_cooldown_seconds,
    )
    with contextlib.suppress(Rejected):
        await handler.handle(org, command, actor=SYSTEM, command_id=f"attempt-{task_id}-{seq}")


async def record_task_outcome(handler: CommandHandler, org: str, task_id: str, outcome: Outcome) -> None:
    """After a fail or a completion: a non-retryable failure or a completion counts for its worker."""
    if outcome.duplicate:
        return
    for recorded in outcome.events:
        event = recorded.event
        if isinstance(event, TaskFailed):
            await record_attempt(handler, org, event.worker_id, task_id, "failed", recorded.seq)
        elif isinstance(event, TaskCompleted) and _may_have_failures(handler, org, event.worker_id):
            await record_attempt(handler, org, event.worker_id, task_id, "succeeded", recorded.seq)


def _may_have_failures(handler: CommandHandler, org: str, worker_id: str) -> bool:
    """A success only resets a count of failures: with none counted (as this gateway last saw the worker,
    at its claim), recording it would cost a read of the log to be refused."""
    worker = handler.cached_state(org, "worker", worker_id)
    return not isinstance(worker, Worker) or worker.consecutive_failures > 0


class LeaseExpiries:
    """The claim index's lease-expiry hook: records each as a failed attempt of the lease's worker."""

    def __init__(self) -> None:
        self.handler: CommandHandler | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def __call__(self, org: str, worker_id: str, task_id: str, seq: int) -> None:
        if self.handler is None:
            return
        task = asyncio.get_running_loop().create_task(
            record_attempt(self.handler, org, worker_id, task_id, "lease_expired", seq)
        )
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not record a lease expiry on its worker", exc_info=task.exception())

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


BREAKER_STALENESS_SECONDS = 1.0
"""How old this gateway's copy of a worker may be when a claim checks its breaker. Attempts this
gateway records update its copy at once; a breaker another gateway opens (or an admin resets there)
is seen here within this time, instead of a read of the log on every claim."""


async def open_breaker(handler: CommandHandler, org: str, worker_id: str, now: Any) -> Worker | None:
    """The worker if its breaker is open now (it must be offered nothing), else None."""
    worker, _ = await handler.load(org, "worker", worker_id, max_age=BREAKER_STALENESS_SECONDS)
    if isinstance(worker, Worker) and worker.breaker_open(now):
        return worker
    return None
