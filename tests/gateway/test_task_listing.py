"""Listing tasks by workflow, and the read model's newest-first pages the console shows."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import Stack
from tests.gateway.test_api import queue, submit

pytestmark = pytest.mark.integration


async def test_tasks_list_by_workflow_name(stack: Stack) -> None:
    q = queue()
    async with stack.client(role="submitter") as c:
        named = await submit(c, q, workflow={"name": "Release Train.v2", "version": 1})
        await submit(c, q, workflow={"name": "other", "version": 1})
        await submit(c, q)
        listed = await c.get("/v1/tasks", params={"queue": q, "workflow": "Release Train.v2", "min_seq": named["seq"]})
    assert listed.status_code == 200, listed.text
    assert [t["id"] for t in listed.json()["items"]] == [named["id"]]


async def test_newest_first_pages_cover_every_task_once_in_reverse_order(stack: Stack) -> None:
    q = queue()
    async with stack.client(role="submitter") as c:
        ids = [(await submit(c, q))["id"] for _ in range(5)]
    await stack.services.read_model.wait_for("tasks", await stack.services.store.last_seq(), timeout=10)
    seen, cursor = [], None
    while True:
        rows, cursor = await stack.services.read_model.list_tasks(
            "acme", queue=q, limit=2, cursor=cursor, newest_first=True
        )
        seen += [(task.created_at, task.id) for task, _ in rows]
        if cursor is None:
            break
    assert sorted(task_id for _, task_id in seen) == sorted(ids)
    assert seen == sorted(seen, reverse=True)


async def test_a_list_shows_the_callers_own_writes_without_min_seq(stack: Stack) -> None:
    """Reads reflect the caller's own earlier writes, lists included: no ``min_seq`` needed."""
    q = queue()
    for _ in range(5):  # the projector is fast; repeating makes a missed wait show up
        async with stack.client(role="submitter") as c:
            task = await submit(c, q)
            listed = await c.get("/v1/tasks", params={"queue": q})
            assert task["id"] in [t["id"] for t in listed.json()["items"]]
            cancelled = await c.post(f"/v1/tasks/{task['id']}/cancel", json={"reason": "read your writes"})
            assert cancelled.status_code == 200, cancelled.text
            listed = await c.get("/v1/tasks", params={"queue": q, "status": "cancelled"})
            assert task["id"] in [t["id"] for t in listed.json()["items"]]
    async with stack.client(role="approver") as approver:
        approvals = await approver.get("/v1/approvals", params={"task_id": task["id"]})
        assert approvals.status_code == 200  # another credential's read waits for nothing of theirs
