"""``GET /v1/tasks/{id}?wait_seconds=N``: a client without SSE waits for the end of a task in one request."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.gateway.conftest import Stack
from tests.gateway.test_api import claim, problem, queue, submit

pytestmark = pytest.mark.integration


async def test_the_answer_comes_when_the_task_ends_not_at_the_deadline(stack: Stack) -> None:
    q = queue()
    async with stack.client(role="admin") as c:
        task = await submit(c, q)
        claimed = await claim(c, q)
        assert claimed is not None

        async def complete_later() -> None:
            await asyncio.sleep(0.5)
            done = await c.post(
                f"/v1/tasks/{task['id']}/complete",
                json={"worker_id": "w1", "lease_id": claimed["lease"]["id"], "result": {"ok": True}},
            )
            assert done.status_code == 200, done.text

        started = time.monotonic()
        completing = asyncio.create_task(complete_later())
        waited = await c.get(f"/v1/tasks/{task['id']}", params={"wait_seconds": 20})
        elapsed = time.monotonic() - started
        await completing
    assert waited.status_code == 200, waited.text
    assert waited.json()["status"] == "completed"
    assert waited.json()["result"] == {"ok": True}
    assert 0.4 < elapsed < 5, elapsed


async def test_at_the_deadline_the_task_comes_as_it_is_then(stack: Stack) -> None:
    async with stack.client(role="viewer") as viewer, stack.client(role="submitter") as submitter:
        task = await submit(submitter, queue())
        started = time.monotonic()
        waited = await viewer.get(f"/v1/tasks/{task['id']}", params={"wait_seconds": 1})
        elapsed = time.monotonic() - started
    assert waited.status_code == 200, waited.text
    assert waited.json()["status"] == "pending"
    assert 0.9 < elapsed < 4, elapsed


async def test_a_terminal_task_answers_at_once_and_bad_waits_are_422(stack: Stack) -> None:
    async with stack.client(role="admin") as c:
        task = await submit(c, queue())
        assert (await c.post(f"/v1/tasks/{task['id']}/cancel", json={})).status_code == 200
        started = time.monotonic()
        waited = await c.get(f"/v1/tasks/{task['id']}", params={"wait_seconds": 60})
        assert waited.json()["status"] == "cancelled"
        assert time.monotonic() - started < 2
        for bad in ("61", "-1", "1.5", "²", "9" * 30):
            problem(await c.get(f"/v1/tasks/{task['id']}", params={"wait_seconds": bad}), 422)
        assert (await c.get("/v1/tasks/nope", params={"wait_seconds": 1})).status_code == 404
