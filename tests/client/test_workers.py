"""Workers through the client: registering and heartbeats, and the worker loop, which claims tasks,
renews each lease while its handler runs, and completes the task with the handler's return value or
fails it with the exception it raised, until it is stopped."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from controlplane.client import Task
from core.ids import new_id
from tests.client.conftest import Connect
from tests.gateway.conftest import Stack
from tests.gateway.test_api import queue, submit

pytestmark = pytest.mark.integration

SLOW_SECONDS = 2.5
LEASE_SECONDS = 1.0
"""A third of the slow handler's run: unrenewed, its lease would lapse twice over."""


def outcome(task: Task) -> Any:
    """What the handler does with a task: double ``n``, or raise when asked to."""
    if task.payload.get("explode"):
        raise RuntimeError("boom")
    return {"doubled": task.payload["n"] * 2}


async def test_register_and_heartbeat(connect: Connect) -> None:
    client = connect("worker")
    worker_id, q = f"w{new_id()[-10:]}", queue()
    worker = await client.workers.register(worker_id, queue=q, capabilities=["gpu"], labels={"zone": "a"})
    assert (worker.id, worker.queue, worker.capabilities, worker.labels) == (worker_id, q, ["gpu"], {"zone": "a"})
    assert (await client.workers.heartbeat(worker_id, "busy")).status == "busy"


async def test_the_worker_loop_completes_and_fails_tasks_until_stopped(connect: Connect, stack: Stack) -> None:
    client = connect("worker")
    worker_id, q = f"w{new_id()[-10:]}", queue()
    async with stack.client(role="submitter") as submitter:
        slow = await submit(submitter, q, payload={"n": 1, "slow": True}, max_retries=0)
        quick = await submit(submitter, q, payload={"n": 21}, max_retries=0)
        exploding = await submit(submitter, q, payload={"explode": True}, max_retries=0)

    stop: threading.Event | asyncio.Event
    if client.flavor == "sync":
        stop = threading.Event()

        def handle(task: Task) -> Any:
            if task.payload.get("slow"):
                time.sleep(SLOW_SECONDS)
            return outcome(task)

    else:
        stop = asyncio.Event()

        async def handle(task: Task) -> Any:  # type: ignore[misc]  # the async client awaits a coroutine function
            if task.payload.get("slow"):
                await asyncio.sleep(SLOW_SECONDS)
            return outcome(task)

    working = asyncio.create_task(
        client.workers.run(worker_id, handle, queue=q, block_ms=300, lease_seconds=LEASE_SECONDS, stop=stop)
    )
    async with stack.client(role="viewer") as viewer:
        ended = {}
        for task in (slow, quick, exploding):
            answer = await viewer.get(f"/v1/tasks/{task['id']}", params={"wait_seconds": 30})
            ended[task["id"]] = answer.json()
        assert not working.done(), working
        stop.set()
        await asyncio.wait_for(working, 10)
        worker = (await viewer.get(f"/v1/workers/{worker_id}")).json()

    assert [(ended[t["id"]]["status"], ended[t["id"]]["result"]) for t in (slow, quick)] == [
        ("completed", {"doubled": 2}),
        ("completed", {"doubled": 42}),
    ]
    assert ended[exploding["id"]]["status"] == "failed"
    assert ended[exploding["id"]]["error"] == {"type": "RuntimeError", "message": "boom"}
    events = await client.take(3, task_id=slow["id"])
    assert [event.type for event in events] == ["TaskSubmitted", "TaskClaimed", "TaskHeartbeat"], "lease renewed"
    assert events[1].data["worker_id"] == worker_id
    assert worker["status"] == "draining", "a stopped loop says so"
