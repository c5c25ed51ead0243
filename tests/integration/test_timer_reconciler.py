"""The timer reconciler against a real nats-server and PostgreSQL: a timer lost after its command
committed (a task's lease, a schedule's next fire) is armed again from state, fires, and a second run
arms nothing."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from controlplane.timers import RECONCILER_ACTOR, reconcile
from core.domain.commands import SYSTEM, Actor, ClaimTask, CreateSchedule, RegisterWorker, SubmitTask
from core.domain.schedules import SCHEDULE
from core.domain.subjects import aggregate_subject
from core.domain.task_decider import TASK
from core.domain.worker import WORKER
from core.log.event_store import TIMER_ACTOR
from core.log.handler import CommandHandler, timer_subject
from core.log.store import JetStreamEventStore
from projections.projector import Projector
from projections.read import ReadModel
from tests.integration.test_projections import caught_up, running

pytestmark = pytest.mark.integration

WORKER_ACTOR = Actor("worker-key", frozenset({"worker"}))


async def test_a_lost_lease_timer_is_armed_again_and_fires(
    handler: CommandHandler,
    store: JetStreamEventStore,
    org: str,
    pool: asyncpg.Pool,
    projector: Projector,
    read_model: ReadModel,
) -> None:
    await handler.handle(org, RegisterWorker(worker_id="w1", heartbeat_timeout_seconds=600), actor=WORKER_ACTOR)
    await handler.handle(org, SubmitTask(task_id="t1", task_type="deploy"), actor=SYSTEM)
    claimed = await handler.handle(
        org, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=2), actor=WORKER_ACTOR
    )
    task_subject = aggregate_subject(org, "task", "t1")
    [lease_timer] = [timer_subject(task_subject, timer) for timer in TASK.timers(claimed.state)]
    worker_state, _ = await handler.load(org, "worker", "w1")
    [liveness_timer] = [timer_subject(aggregate_subject(org, "worker", "w1"), t) for t in WORKER.timers(worker_state)]
    created = await handler.handle(org, CreateSchedule(schedule_id="nightly", cron="0 3 * * *", task={}), actor=SYSTEM)
    schedule_subject = aggregate_subject(org, "schedule", "nightly")
    [fire_timer] = [timer_subject(schedule_subject, timer) for timer in SCHEDULE.timers(created.state)]
    # What an arming that failed after its commit leaves: the task runs, and nothing will expire its
    # lease; the schedule waits for a fire that never comes.
    for lost in (lease_timer, fire_timer):
        await store.nc.jetstream().purge_stream(store.stream, subject=lost)
        assert not await store.holds(lost)
    assert await store.holds(liveness_timer)

    async with running(projector):
        await caught_up(projector)
        first = await reconcile(handler, read_model, org=org)
        assert (first.tasks, first.workers, first.schedules) == (1, 1, 1)
        assert first.armed == (lease_timer, fire_timer)
        again = await reconcile(handler, read_model, org=org)
        assert again.armed == (), "a timer the log holds is not armed twice"

    async with asyncio.timeout(15):
        while (await handler.load(org, "task", "t1"))[0].status != "pending":
            await asyncio.sleep(0.1)
    history = await handler.history(org, "task", "t1")
    assert type(history[-1].event).__name__ == "TaskLeaseExpired"
    assert history[-1].actor == TIMER_ACTOR
    assert RECONCILER_ACTOR != TIMER_ACTOR
