"""Claiming tasks, one or a batch: candidates come from the claim index (``application/claim_index.py``)
in claim order, and each is won through the log's optimistic concurrency (a stale candidate only costs a
lost race). A claimer that finds nothing waits on its queue until a task opens up or its time is up;
a worker whose circuit breaker is open is offered nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec

from application.bodies import ClaimBody
from application.breakers import open_breaker
from application.claim_index import ClaimIndex
from application.idempotency import IdempotencyRecords, derived_id
from application.principal import Principal
from application.queues import settings_of
from core.domain.commands import ClaimTask
from core.domain.errors import (
    AlreadyTerminal,
    CapabilityMismatch,
    CommandIdTaken,
    InvalidTransition,
    NotFound,
    NotReady,
)
from core.domain.events import TaskClaimed
from core.domain.ids import new_id
from core.domain.task import Task
from core.log.handler import CommandHandler

CLAIM_CANDIDATES = 16
WAKE_CHECK_SECONDS = 1.0
"""How long a waiting claimer sleeps at most before it looks again (for a caller that went away, or a
backoff that ran out) even if no task opened up."""
_UNCLAIMABLE = (InvalidTransition, NotReady, CapabilityMismatch, AlreadyTerminal, NotFound)


class Claim(msgspec.Struct, frozen=True):
    """A won claim: the task as the claim left it, the claim's stream sequence, the lease, and the
    correlation id and ``traceparent`` of the task's submit, which the worker sends on with every call
    for the task (so its events carry the submit's correlation id, and its spans join the submit's trace)."""

    task: Task
    seq: int
    lease_id: str
    lease_expires_at: datetime
    correlation_id: str | None
    traceparent: str | None


async def _never_gone() -> bool:
    return False


async def claim_tasks(
    handler: CommandHandler,
    index: ClaimIndex,
    idempotency: IdempotencyRecords,
    who: Principal,
    spec: ClaimBody,
    *,
    max_tasks: int,
    block_seconds: float,
    key: str | None,
    clock: Callable[[], datetime],
    gone: Callable[[], Awaitable[bool]] = _never_gone,
) -> list[Claim]:
    """Up to ``max_tasks`` claims for ``who`` (who must be allowed to claim), in claim order, returned
    as soon as at least one succeeded, or empty after ``block_seconds``. With an idempotency ``key`` each
    lease id is derived from it, and a retry returns the original claims. ``gone`` answers whether the
    caller went away: nobody would receive the leases, and claiming then would strand the tasks until
    they expired. ``clock`` is the time due tasks are judged by."""
    who.require("claim")
    lease_ids = [
        new_id() if key is None else derived_id(who.org, who.credential_id, key, "claim" if i == 0 else f"claim-{i}")
        for i in range(max_tasks)
    ]
    taken: set[str] = set()

    async def attempt(task_id: str, lease_id: str) -> Claim | None:
        command = ClaimTask(
            task_id=task_id,
            worker_id=spec.worker_id,
            lease_id=lease_id,
            queue=spec.queue,
            capabilities=spec.capabilities,
            lease_seconds=spec.lease_seconds,
        )
        index.claims_in_flight.add(task_id)
        try:
            outcome = await handler.handle(who.org, command, actor=who.actor, command_id=lease_id)
        except _UNCLAIMABLE:
            return None
        except CommandIdTaken:
            # A retried request whose first try claimed another task with this lease id, and whose
            # answer was lost before the claim was remembered: that lease expires unrenewed.
            taken.add(lease_id)
            return None
        finally:
            index.claims_in_flight.discard(task_id)
        if key is not None:
            await idempotency.remember(lease_id, task_id)
        claimed = next(
            r.event for r in outcome.events if isinstance(r.event, TaskClaimed) and r.event.lease_id == lease_id
        )
        origin = await handler.origin(who.org, "task", task_id)  # cached: the claim just read the task
        return Claim(
            task=outcome.state,
            seq=outcome.seq,
            lease_id=lease_id,
            lease_expires_at=claimed.lease_expires_at,
            correlation_id=None if origin is None else origin.correlation_id,
            traceparent=None if origin is None else origin.traceparent,
        )

    if key is not None:
        recalled = await asyncio.gather(*(idempotency.recall(lease_id) for lease_id in lease_ids))
        replayed = [
            await attempt(task_id, lease_id) for task_id, lease_id in zip(recalled, lease_ids, strict=True) if task_id
        ]
        if replayed:
            return [won for won in replayed if won is not None]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + block_seconds
    if await open_breaker(handler, who.org, spec.worker_id, clock()) is not None:
        # Its circuit breaker is open: offered nothing (after block_seconds, so a runner does not spin).
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        return []
    capabilities = list(spec.capabilities)
    claimed: list[Claim] = []
    unused = list(lease_ids)
    while unused:
        wanted = max_tasks - len(claimed)
        candidates = index.candidates(
            who.org,
            spec.queue,
            capabilities,
            clock(),
            max(CLAIM_CANDIDATES, 2 * wanted),
            workflows_only=spec.workflows_only,
            worker_id=spec.worker_id,
        )
        # Racing another claimer of this process for the same task would only lose: try the others first.
        ordered = sorted(candidates, key=index.claims_in_flight.__contains__)
        while ordered and len(claimed) < max_tasks:
            # A batch tries as many candidates at once as it still wants (each on its own task's subject),
            # so a runner taking back many tasks pays one round of appends, not one per task.
            tries, ordered = ordered[: max_tasks - len(claimed)], ordered[max_tasks - len(claimed) :]
            leases = unused[: len(tries)]
            for lease_id, won in zip(leases, await asyncio.gather(*map(attempt, tries, leases)), strict=True):
                if won is not None:
                    claimed.append(won)
                if won is not None or lease_id in taken:
                    unused.remove(lease_id)
            if not unused:
                break
        remaining = deadline - loop.time()
        if claimed or remaining <= 0:
            return claimed
        # Woken when a task on this queue opens up, and at least every second to notice a caller that
        # went away or a backoff that ran out.
        await index.wait(
            who.org,
            spec.queue,
            min(remaining, WAKE_CHECK_SECONDS),
            worker_id=spec.worker_id,
            capabilities=capabilities,
            workflows_only=spec.workflows_only,
            strategy=(await settings_of(handler, who.org, spec.queue)).strategy,
        )
        if await gone():  # asked only after a wait: a claim that finds a task at once never asks
            return []
    return claimed  # every lease id this request may use named another claim
