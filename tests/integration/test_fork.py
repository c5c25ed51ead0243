"""``application.fork``: a fork is written through the command handler, part by part. A retry with the
same command id appends nothing; a fork never lands on another task; and only the finished fork arms
timers, so a timer already due in the middle of a long fork cannot fire between two of its parts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.msg import Msg

from application.fork import FORK_BATCH, Forked, fork_task
from core.domain.commands import Actor, ClaimTask, HeartbeatTask, RequestApproval, SubmitTask
from core.domain.errors import AlreadyExists
from core.domain.events import ApprovalTimedOut, decode_event
from core.domain.history import plan_fork
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject
from core.log.handler import CommandHandler
from core.log.memory_store import InMemoryEventStore
from core.log.store import JetStreamEventStore

pytestmark = pytest.mark.integration

WORKER = Actor("w1", frozenset({"worker"}))
LEASE = {"worker_id": "w1", "lease_id": "l1"}


async def source_history(
    handler: CommandHandler, org: str, *, heartbeats: int, lease_seconds: float = 600
) -> list[RecordedEvent]:
    """Submit, claim, ``heartbeats`` heartbeats under one lease, then ask a human (which ends the lease)."""
    task_id = new_id()
    await handler.handle(org, SubmitTask(task_id=task_id, task_type="long"), actor=Actor("alice"))
    await handler.handle(org, ClaimTask(task_id=task_id, **LEASE, lease_seconds=lease_seconds), actor=WORKER)
    for beat in range(heartbeats):
        await handler.handle(org, HeartbeatTask(task_id=task_id, **LEASE, progress=beat), actor=WORKER)
    asked = RequestApproval(task_id=task_id, **LEASE, approval_id=f"{task_id}-1", reason="go?", timeout_seconds=60)
    await handler.handle(org, asked, actor=WORKER)
    return await handler.history(org, "task", task_id)


async def task_and_timers(store: JetStreamEventStore, org: str, task_id: str) -> list[RecordedEvent]:
    """Everything the log holds for a task: its events, then the definitions of its timers."""
    events = await store.read_subject(aggregate_subject(org, "task", task_id))
    return events + await store.read_subject(f"cpsched.{org}.task.{task_id}.>")


async def test_a_retried_fork_with_the_same_command_id_appends_nothing(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    history = await source_history(handler, org, heartbeats=FORK_BATCH + 10)
    fork = f"fork-{new_id()[-8:]}"
    plan = plan_fork(history, task_id=fork, at_seq=history[-1].seq)
    first = await fork_task(handler, org, plan, command_id=f"once-{fork}")
    assert first.appended == len(plan.events) == FORK_BATCH + 13
    written = await task_and_timers(store, org, fork)

    # Again, on a handler that has never seen the fork: every part is found written, nothing is appended.
    retried = CommandHandler(store)
    assert await fork_task(retried, org, plan, command_id=f"once-{fork}") == Forked(first.last_seq, 0)
    assert await task_and_timers(store, org, fork) == written

    # Another command id, or another fork under the same one: the task exists, nothing is appended.
    with pytest.raises(AlreadyExists, match=f"task {fork} already exists in org {org}"):
        await fork_task(handler, org, plan, command_id=f"other-{fork}")
    shorter = plan_fork(history, task_id=fork, at_seq=history[0].seq)
    with pytest.raises(AlreadyExists, match=f"command id once-{fork} wrote another fork"):
        await fork_task(handler, org, shorter, command_id=f"once-{fork}")
    assert await task_and_timers(store, org, fork) == written


async def test_only_the_finished_fork_arms_timers(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    """A source recorded an hour ago: at the end of the fork's first part a lease is held whose expiry
    is long past. Armed then, it would fire between the parts; only the approval timeout the finished
    fork wants is armed (and, past due, fires at once)."""
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    recorded = CommandHandler(InMemoryEventStore(), clock=lambda: an_hour_ago)
    history = await source_history(recorded, org, heartbeats=FORK_BATCH + 10, lease_seconds=60)
    fork = f"old-{new_id()[-8:]}"
    plan = plan_fork(history, task_id=fork, at_seq=history[-1].seq)
    armed: list[Msg] = []

    async def arming(msg: Msg) -> None:
        armed.append(msg)

    watching = await store.nc.subscribe(f"cpsched.{org}.task.{fork}.>", cb=arming)
    await fork_task(handler, org, plan, command_id=f"fork-{fork}")
    await store.nc.flush()
    await watching.unsubscribe()
    assert [decode_event(msg.data) for msg in armed] == [
        ApprovalTimedOut(at=plan.state.approvals[0].expires_at, approval_id=f"{fork}-1")
    ]

    subject = aggregate_subject(org, "task", fork)
    async with asyncio.timeout(10):
        while len(written := await store.read_subject(subject)) == len(plan.events):
            await asyncio.sleep(0.05)
    assert [item.event for item in written[: len(plan.events)]] == list(plan.events)
    assert [type(item.event) for item in written[len(plan.events) :]] == [ApprovalTimedOut]
