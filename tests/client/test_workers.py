"""Workers through the client: registering and heartbeats, and the worker loop, which claims tasks,
renews each lease while its handler runs, and completes the task with the handler's return value or
fails it with the exception it raised, until it is stopped."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from controlplane.client import Conflict, NotFound, Task
from core.domain.ids import new_id
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
    await client.workers.deregister(worker_id)
    with pytest.raises(NotFound):
        await client.workers.deregister(worker_id)


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


async def test_a_hand_written_worker_claims_renews_completes_and_fails(connect: Connect) -> None:
    worker, submitter = connect("worker"), connect("submitter")
    worker_id, q = f"w{new_id()[-10:]}", queue()
    await worker.workers.register(worker_id, queue=q, capabilities=["gpu"])
    assert await worker.workers.claim(worker_id, queue=q, capabilities=["gpu"]) is None, "nothing to claim yet"
    on_gpu = await submitter.submit("render", {"n": 1}, queue=q, required_capabilities=["gpu"], max_retries=0)
    anywhere = await submitter.submit("render", {"n": 2}, queue=q, max_retries=0)

    plain = await worker.workers.claim(worker_id, queue=q, block_ms=5000)
    assert plain is not None and plain.task.id == anywhere.id, "the older task needs a capability not offered"
    claim = await worker.workers.claim(worker_id, queue=q, capabilities=["gpu"], block_ms=5000, lease_seconds=5)
    assert claim is not None and claim.task.id == on_gpu.id
    assert (claim.worker_id, claim.task.status, claim.task.assigned_worker) == (worker_id, "running", worker_id)

    renewed = await worker.workers.heartbeat_lease(claim, progress={"frames": 12}, lease_seconds=60)
    assert renewed.id == claim.lease.id and renewed.expires_at > claim.lease.expires_at
    done = await worker.workers.complete(claim, {"frames": 24})
    assert (done.id, done.status, done.result) == (on_gpu.id, "completed", {"frames": 24})
    events = await worker.take(4, task_id=on_gpu.id)
    assert [event.type for event in events] == ["TaskSubmitted", "TaskClaimed", "TaskHeartbeat", "TaskCompleted"]
    assert events[2].data["progress"] == {"frames": 12}

    failed = await worker.workers.fail(plain, RuntimeError("no GPU here"), retryable=False)
    assert (failed.status, failed.error) == ("failed", {"type": "RuntimeError", "message": "no GPU here"})
    with pytest.raises(Conflict):
        await worker.workers.complete(plain, {"frames": 0})
