"""The hand-written PostgreSQL queue that bench/lifecycle.py measures us against must be a correct queue,
or the comparison means nothing: a claim hands a task to one worker only, a waiting claim wakes when a
task arrives, a lease is only good while held, and the whole HITL lifecycle completes every task.
It runs as the benchmark runs it: its own process, on a fresh database of the session's PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))  # the benchmarks are scripts, not a package
from lifecycle import Lifecycle, Target, baseline_service

QUEUE = "q"


@pytest.fixture
async def service(database_url: str, tmp_path: Path) -> AsyncIterator[Target]:
    with baseline_service(database_url, tmp_path) as (target, _pid, _database):
        yield target


def client(target: Target, role: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=target.url, headers={"Authorization": f"Bearer {target.keys[role]}"}, timeout=30)


async def submit(target: Target, count: int) -> list[str]:
    async with client(target, "submitter") as http:
        answers = [await http.post("/v1/tasks", json={"type": "t", "queue": QUEUE}) for _ in range(count)]
    assert all(answer.status_code == 201 for answer in answers)
    return [answer.json()["id"] for answer in answers]


async def test_concurrent_claims_never_hand_out_a_task_twice(service: Target) -> None:
    submitted = await submit(service, 10)
    async with client(service, "worker") as http:
        answers = await asyncio.gather(
            *(http.post("/v1/tasks/claim", json={"worker_id": f"w{i}", "queue": QUEUE}) for i in range(30))
        )
    claimed = [answer.json()["task"]["id"] for answer in answers if answer.status_code == 200]
    assert sorted(claimed) == sorted(submitted)
    assert sum(answer.status_code == 204 for answer in answers) == 20


async def test_a_waiting_claim_is_woken_by_a_new_task(service: Target) -> None:
    async with client(service, "worker") as http:
        waiting = asyncio.create_task(
            http.post("/v1/tasks/claim", json={"worker_id": "w", "queue": QUEUE, "block_ms": 10_000})
        )
        await asyncio.sleep(0.5)
        assert not waiting.done()
        started = time.monotonic()
        [task_id] = await submit(service, 1)
        answer = await waiting
    assert answer.status_code == 200
    assert answer.json()["task"]["id"] == task_id
    assert time.monotonic() - started < 2


async def test_a_lease_is_good_only_while_held(service: Target) -> None:
    [task_id] = await submit(service, 1)
    async with client(service, "worker") as http:
        first = await http.post("/v1/tasks/claim", json={"worker_id": "w1", "queue": QUEUE, "lease_seconds": 1})
        lease = {"worker_id": "w1", "lease_id": first.json()["lease"]["id"]}
        wrong = await http.post(f"/v1/tasks/{task_id}/heartbeat", json={**lease, "lease_id": "not-the-lease"})
        assert wrong.status_code == 409
        await asyncio.sleep(1.2)  # the lease expires: the next claim takes the task back
        second = await http.post("/v1/tasks/claim", json={"worker_id": "w2", "queue": QUEUE})
        late = await http.post(f"/v1/tasks/{task_id}/complete", json={**lease, "result": {"late": True}})
    assert second.status_code == 200
    assert second.json()["task"]["id"] == task_id
    assert second.json()["task"]["retries"] == 1
    assert late.status_code == 409


async def test_the_whole_lifecycle_completes_every_task(service: Target) -> None:
    async with asyncio.timeout(60):  # a lost approval or claim would otherwise hang the run
        result = await Lifecycle(service.url, service.keys, tasks=40, workers=2, in_flight=4).run()
    assert result["tasks"] == 40
    async with client(service, "viewer") as http:
        tasks = (await http.get("/v1/tasks", params={"limit": 500})).json()["items"]
    lifecycle_tasks = [task for task in tasks if task["queue"].startswith("bench")]
    assert len(lifecycle_tasks) == 40
    assert {task["status"] for task in lifecycle_tasks} == {"completed"}
    assert all(len(task["approvals"]) == 1 and task["approvals"][0]["status"] == "approved" for task in lifecycle_tasks)
