"""Workers' circuit breakers and ``excluded_workers`` over HTTP, through the real stack: a worker that
fails three tasks in a row is offered nothing (another worker gets the task) until an admin resets
it; a task never goes to a worker it excludes."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import appended_since, last_seq, problem, queue, submit
from tests.gateway.test_console_http import sign_in

pytestmark = pytest.mark.integration


def client(stack: Stack, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=20)


async def register(c: httpx.AsyncClient, worker_id: str, q: str) -> dict[str, Any]:
    r = await c.post("/v1/workers", json={"worker_id": worker_id, "queue": q})
    assert r.status_code == 201, r.text
    return r.json()


async def claim(c: httpx.AsyncClient, worker_id: str, q: str) -> dict[str, Any] | None:
    r = await c.post("/v1/tasks/claim", json={"worker_id": worker_id, "queue": q})
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else None


async def fail(c: httpx.AsyncClient, claimed: dict[str, Any], worker_id: str) -> None:
    task_id, lease_id = claimed["task"]["id"], claimed["lease"]["id"]
    body = {"worker_id": worker_id, "lease_id": lease_id, "error": {"boom": True}, "retryable": False}
    r = await c.post(f"/v1/tasks/{task_id}/fail", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"


async def complete(c: httpx.AsyncClient, claimed: dict[str, Any], worker_id: str) -> None:
    task_id, lease_id = claimed["task"]["id"], claimed["lease"]["id"]
    r = await c.post(f"/v1/tasks/{task_id}/complete", json={"worker_id": worker_id, "lease_id": lease_id})
    assert r.status_code == 200, r.text


async def fail_one(c: httpx.AsyncClient, submitter: httpx.AsyncClient, worker_id: str, q: str) -> None:
    await submit(submitter, q)
    claimed = await claim(c, worker_id, q)
    assert claimed is not None
    await fail(c, claimed, worker_id)


async def test_three_failures_open_the_breaker_until_an_admin_resets_it(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with (
        client(stack, keys["worker"]) as w,
        client(stack, keys["submitter"]) as s,
        client(stack, keys["admin"]) as admin,
    ):
        await register(w, "flaky", q)
        await register(w, "steady", q)
        # A success resets the count: two failures, a success, two failures leave it closed.
        await fail_one(w, s, "flaky", q)
        await fail_one(w, s, "flaky", q)
        await submit(s, q)
        ok = await claim(w, "flaky", q)
        assert ok is not None
        await complete(w, ok, "flaky")
        assert (await w.get("/v1/workers/flaky")).json()["breaker"]["failures"] == 0
        await fail_one(w, s, "flaky", q)
        await fail_one(w, s, "flaky", q)
        doc = (await w.get("/v1/workers/flaky")).json()
        assert doc["status"] != "failed"
        assert doc["breaker"] == {"failures": 2, "open_until": None}

        await fail_one(w, s, "flaky", q)  # the third in a row
        doc = (await w.get("/v1/workers/flaky")).json()
        assert doc["status"] == "failed"
        assert doc["breaker"]["failures"] == 3 and doc["breaker"]["open_until"] is not None

        task = await submit(s, q)
        assert await claim(w, "flaky", q) is None  # offered nothing, though a task waits
        # A heartbeat does not make it ready while the breaker is open.
        r = await w.post("/v1/workers/flaky/heartbeat", json={"status": "ready"})
        assert r.status_code == 200 and r.json()["status"] == "failed"
        assert await claim(w, "flaky", q) is None
        other = await claim(w, "steady", q)
        assert other is not None and other["task"]["id"] == task["id"]

        # Only an admin resets it; a reset of a closed breaker is a 409 that appends nothing.
        problem(await w.post("/v1/workers/flaky/reset"), 403)
        problem(await s.post("/v1/workers/flaky/reset"), 403)
        before = await last_seq(stack)
        problem(await admin.post("/v1/workers/steady/reset"), 409)
        problem(await admin.post("/v1/workers/nobody/reset"), 404)
        assert await appended_since(stack, before, org) == []
        r = await admin.post("/v1/workers/flaky/reset")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ready"
        assert r.json()["breaker"] == {"failures": 0, "open_until": None}

        again = await submit(s, q)
        claimed = await claim(w, "flaky", q)
        assert claimed is not None and claimed["task"]["id"] == again["id"]


async def test_the_worker_list_and_the_console_show_an_open_breaker(stack: Stack) -> None:
    _, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["worker"]) as w, client(stack, keys["submitter"]) as s:
        await register(w, "tripped", q)
        for _ in range(3):
            await fail_one(w, s, "tripped", q)
    async with client(stack, keys["admin"]) as admin:
        for _ in range(100):  # the list comes from the read model: the projector may lag a moment
            [row] = (await admin.get("/v1/workers", params={"queue": q})).json()["items"]
            if row["status"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert row["status"] == "failed"
        assert row["breaker"]["failures"] == 3 and row["breaker"]["open_until"] is not None
    async with sign_in(stack, keys["admin"]) as browser:
        page = await browser.get("/console/workers", params={"fragment": "1"})
        assert page.status_code == 200
        cell = re.search(
            r'<tr data-testid="worker-row" data-worker-id="tripped" data-status="(\w+)".*?'
            r'data-testid="worker-breaker" data-failures="(\d+)">([^<]*)',
            page.text,
            re.S,
        )
        assert cell is not None, page.text
        assert cell.group(1) == "failed" and cell.group(2) == "3" and cell.group(3).startswith("open until")


async def test_excluded_workers_are_never_offered_the_task(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["worker"]) as w, client(stack, keys["submitter"]) as s:
        task = await submit(s, q, excluded_workers=["banned", "banned"])
        assert task["excluded_workers"] == ["banned"]
        assert await claim(w, "banned", q) is None
        claimed = await claim(w, "allowed", q)
        assert claimed is not None and claimed["task"]["id"] == task["id"]

        before = await last_seq(stack)
        problem(await s.post("/v1/tasks", json={"type": "t", "queue": q, "excluded_workers": ["bad id!"]}), 422)
        too_many = [f"w{i}" for i in range(65)]
        problem(await s.post("/v1/tasks", json={"type": "t", "queue": q, "excluded_workers": too_many}), 422)
        problem(await s.post("/v1/tasks", json={"type": "t", "queue": q, "excluded_workers": "banned"}), 422)
        assert await appended_since(stack, before, org) == []
