"""The projector's cache of folded states against a real nats-server and PostgreSQL: it spares the
batches their loads, yet never hides an event, whoever else folded meanwhile and whenever the
projector loses its leadership."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from core.domain.commands import CompleteTask, DecideApproval, HeartbeatTask, RequestApproval
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from projections.commit import commit_batch
from projections.folds import PROJECTIONS
from projections.folds.cache import StateCache
from projections.leadership import _LOCK_CLASS
from projections.projector import Projector
from projections.read import ReadModel
from tests.integration.test_projections import APPROVERS, WORKER, caught_up, claim, delivered, handle, running, submit

pytestmark = pytest.mark.integration

LOAD_TASKS = "SELECT org_id, id, state FROM tasks"


async def heartbeat(handler: CommandHandler, org: str, task_id: str, step: int) -> int:
    command = HeartbeatTask(task_id=task_id, worker_id="w1", lease_id="l1", progress={"step": step})
    return await handle(handler, org, command, WORKER)


async def test_a_kept_state_is_used_only_when_the_log_proves_it_current(
    handler: CommandHandler, org: str, pool: asyncpg.Pool, store: JetStreamEventStore, read_model: ReadModel
) -> None:
    await submit(handler, org, "t1")
    await claim(handler, org, "t1")
    await heartbeat(handler, org, "t1", 1)
    request = RequestApproval(task_id="t1", worker_id="w1", lease_id="l1", approval_id="a1", reason="ship?")
    await handle(handler, org, request, WORKER)
    await handle(handler, org, DecideApproval(task_id="t1", approval_id="a1", decision="approve"), APPROVERS[0])
    await claim(handler, org, "t1", lease="l2")
    submitted, claimed, beat, requested, decided, reclaimed = await delivered(store, org)

    tasks = [PROJECTIONS["tasks"]]
    cache = StateCache()
    loads: list[str] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda record: loads.append(record.query) if LOAD_TASKS in record.query else None)
        await commit_batch(conn, tasks, [submitted, claimed], cache=cache)
        assert loads == []  # a new task: nothing to load
        await commit_batch(conn, tasks, [beat], cache=cache)
        assert loads == []  # kept at the claim, which the heartbeat names as its subject's previous event
        await commit_batch(conn, tasks, [requested])  # another writer folds the request: the kept state is behind
        await commit_batch(conn, tasks, [decided], cache=cache)
        assert len(loads) == 2  # the other writer's load, and ours: the decision names the request, not the heartbeat
        await commit_batch(conn, tasks, [reclaimed], cache=cache)
        assert len(loads) == 2

    task, seq = await handler.load(org, "task", "t1")
    assert task.approval("a1").status == "approved" and seq == reclaimed.metadata.sequence.stream
    assert await read_model.get_task(org, "t1") == (task, seq)


async def test_a_projector_that_loses_its_leadership_folds_on_from_its_rows(
    handler: CommandHandler, org: str, pool: asyncpg.Pool, projector: Projector, read_model: ReadModel
) -> None:
    task_ids = [f"t{i}" for i in range(4)]
    async with running(projector):
        for task_id in task_ids:
            await submit(handler, org, task_id)
            await claim(handler, org, task_id)
        await caught_up(projector)
        leader = await _leader(pool)
        await pool.execute("SELECT pg_terminate_backend($1)", leader)  # its writer locks go with its session
        for task_id in task_ids:
            await heartbeat(handler, org, task_id, 1)
        async with asyncio.timeout(20):
            while (taken_over := await _leader(pool)) in (None, leader):
                await asyncio.sleep(0.05)
        assert taken_over != leader
        for task_id in task_ids[:2]:
            await handle(handler, org, CompleteTask(task_id=task_id, worker_id="w1", lease_id="l1"), WORKER)
        await caught_up(projector)

    for task_id in task_ids:
        assert await read_model.get_task(org, task_id) == await handler.load(org, "task", task_id)


async def _leader(pool: asyncpg.Pool) -> int | None:
    """The backend holding the projectors' writer locks in this database."""
    return await pool.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1",
        _LOCK_CLASS,
    )
