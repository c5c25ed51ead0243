"""Timers on a three-node JetStream cluster (R3): a retired timer leaves the log whichever node the
command's client is connected to. Its purge is sent without waiting for an answer, so only the log can
show that the stream's leader carried it out."""

from __future__ import annotations

import asyncio

from core.domain.commands import SYSTEM, Actor, ClaimTask, HeartbeatTask, SubmitTask
from core.domain.subjects import aggregate_subject
from core.domain.task_decider import TASK
from core.log.handler import CommandHandler, timer_subject
from core.log.store import JetStreamEventStore

WORKER = Actor("worker-key", frozenset({"worker"}))


async def test_a_retired_timer_leaves_the_log_through_every_node(stores: list[JetStreamEventStore]) -> None:
    for node, store in enumerate(stores):
        org = f"retire{node}"
        handler = CommandHandler(store)
        await handler.handle(org, SubmitTask(task_id="t1", task_type="deploy"), actor=SYSTEM)
        claim = ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=600)
        claimed = await handler.handle(org, claim, actor=WORKER)
        subject = aggregate_subject(org, "task", "t1")
        [first] = [timer_subject(subject, timer) for timer in TASK.timers(claimed.state)]
        beat = HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=900)
        beaten = await handler.handle(org, beat, actor=WORKER)
        [second] = [timer_subject(subject, timer) for timer in TASK.timers(beaten.state)]
        async with asyncio.timeout(10):
            while await store.holds(first):
                await asyncio.sleep(0.05)
        assert await store.holds(second), f"node {node}: the purge took the timer that replaced the retired one"
