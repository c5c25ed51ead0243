"""A restarted worker takes its own work back at once, through the real stack: registering again as a
new process (another ``incarnation``) releases the leases the old process held, on the log, and the
tasks are claimable right away; the same process registering again releases nothing, and nothing of
another org, another credential or another worker is touched. A runner killed with ``kill -9`` and
started again under its worker id resumes its workflows within half a second, losing and repeating
nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.client import AsyncClient, Conflict, operations
from core.domain.events import (
    TaskClaimed,
    TaskCompleted,
    TaskLeaseExpired,
    TaskLeaseReleased,
    WorkerRegistered,
    WorkflowOperationRecorded,
)
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.subjects import org_events_filter
from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import queue, submit

pytestmark = pytest.mark.integration

LONG_LEASE = 300
"""Longer than any test runs: a task that comes back did not wait for its lease to run out."""
RESUMED_WITHIN_SECONDS = 0.5


def client(stack: Stack, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=20)


async def register(c: httpx.AsyncClient, worker_id: str, q: str, **fields: Any) -> dict[str, Any]:
    r = await c.post("/v1/workers", json={"worker_id": worker_id, "queue": q, **fields})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def claim_all(c: httpx.AsyncClient, worker_id: str, q: str, count: int) -> list[dict[str, Any]]:
    body = {"worker_id": worker_id, "queue": q, "max_tasks": count, "lease_seconds": LONG_LEASE}
    r = await c.post("/v1/tasks/claim-batch", json=body)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    assert len(items) == count
    return items


async def appended(stack: Stack, org: str, seq: int) -> list[RecordedEvent]:
    return await stack.services.store.read_subject(org_events_filter(org), after_seq=seq)


async def test_a_worker_registered_again_as_a_new_process_gets_its_tasks_back_at_once(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["worker"]) as worker, client(stack, keys["submitter"]) as submitter:
        await register(worker, "w", q, incarnation="first-process")
        ids = sorted([(await submit(submitter, q, max_retries=2))["id"] for _ in range(3)])
        held = await claim_all(worker, "w", q, 3)
        leases = {item["task"]["id"]: item["lease"]["id"] for item in held}
        before = await stack.services.store.last_seq()

        restarted = await register(worker, "w", q, incarnation="second-process")

        assert restarted["released_tasks"] == ids
        events = await appended(stack, org, before)
        [registration] = [r for r in events if isinstance(r.event, WorkerRegistered)]
        assert registration.event.restarted and registration.event.incarnation == "second-process"
        releases = [r for r in events if isinstance(r.event, TaskLeaseReleased)]
        assert {r.subject.rsplit(".", 1)[1]: r.event.lease_id for r in releases} == leases
        assert {(r.event.worker_id, r.event.reason, r.causation_id) for r in releases} == {
            ("w", "worker restarted", registration.command_id)
        }
        assert restarted["seq"] == max(r.seq for r in releases), "the answer's seq covers the releases"
        for task_id in ids:
            task = (await worker.get(f"/v1/tasks/{task_id}")).json()
            assert (task["status"], task["retries"], task["lease"]) == ("pending", 1, None)
            assert task["error"] == {"reason": "worker restarted", "lease_id": leases[task_id]}
        listed = await worker.get("/v1/tasks", params={"queue": q, "min_seq": restarted["seq"]})
        assert {t["status"] for t in listed.json()["items"]} == {"pending"}, "the read model shows it too"

        old_lease = {"worker_id": "w", "lease_id": leases[ids[0]]}
        assert (await worker.post(f"/v1/tasks/{ids[0]}/heartbeat", json=old_lease)).status_code == 409
        again = await claim_all(worker, "w", q, 3)  # at once: block_ms 0
        assert sorted(item["task"]["id"] for item in again) == ids


async def test_the_same_process_registering_again_releases_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["worker"]) as worker, client(stack, keys["submitter"]) as submitter:
        await register(worker, "w", q, incarnation="the-process")
        for _ in range(2):
            await submit(submitter, q)
        held = await claim_all(worker, "w", q, 2)
        before = await stack.services.store.last_seq()

        assert (await register(worker, "w", q, incarnation="the-process"))["released_tasks"] == []
        assert (await register(worker, "w", q))["released_tasks"] == [], "no incarnation names no process"

        events = await appended(stack, org, before)
        assert [type(r.event).__name__ for r in events] == ["WorkerRegistered", "WorkerRegistered"]
        assert not any(r.event.restarted for r in events if isinstance(r.event, WorkerRegistered))
        for item in held:
            task = (await worker.get(f"/v1/tasks/{item['task']['id']}")).json()
            assert (task["status"], task["lease"]["id"]) == ("running", item["lease"]["id"])
        # The recorded incarnation stayed: the same process is still not a restart.
        assert (await register(worker, "w", q, incarnation="the-process"))["released_tasks"] == []


async def test_a_restart_touches_no_other_org_credential_or_worker(stack: Stack) -> None:
    org, keys = await new_org(stack)
    _, elsewhere = await new_org(stack)
    q = queue()
    async with (
        client(stack, keys["worker"]) as worker,
        client(stack, keys["submitter"]) as submitter,
        client(stack, keys["admin"]) as admin,
        client(stack, elsewhere["worker"]) as other_org_worker,
        client(stack, elsewhere["submitter"]) as other_org_submitter,
    ):
        made = await admin.post("/v1/api-keys", json={"name": "second", "roles": ["worker"]})
        assert made.status_code == 201, made.text
        async with client(stack, made.json()["key"]) as other_key:
            await register(worker, "w", q, incarnation="first-process")
            await register(other_org_worker, "w", q, incarnation="first-process")
            for _ in range(3):
                await submit(submitter, q)
            await submit(other_org_submitter, q)
            [ours] = await claim_all(worker, "w", q, 1)
            [same_id_other_key] = await claim_all(other_key, "w", q, 1)
            [other_worker] = await claim_all(worker, "v", q, 1)
            [other_org] = await claim_all(other_org_worker, "w", q, 1)

            restarted = await register(worker, "w", q, incarnation="second-process")

            assert restarted["released_tasks"] == [ours["task"]["id"]]
            for item, reader in ((same_id_other_key, worker), (other_worker, worker), (other_org, other_org_worker)):
                task = (await reader.get(f"/v1/tasks/{item['task']['id']}")).json()
                assert task["status"] == "running" and task["lease"]["expires_at"] == item["lease"]["expires_at"]
            # The other credential's lease of worker id w still works for it.
            lease = {"worker_id": "w", "lease_id": same_id_other_key["lease"]["id"]}
            assert (
                await other_key.post(f"/v1/tasks/{same_id_other_key['task']['id']}/heartbeat", json=lease)
            ).is_success
    assert not [
        r
        for r in await appended(stack, org, 0)
        if isinstance(r.event, TaskLeaseReleased) and r.event.lease_id != ours["lease"]["id"]
    ]


async def until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


async def test_a_runner_killed_mid_workflow_and_restarted_resumes_at_once_losing_and_repeating_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """Three workflows hang inside a step when their runner is ``kill -9``'d; the runner started again
    under the same worker id (with leases of 30 s) claims all three back within half a second of
    registering, and finishes them: each effect lands once, no recorded step runs again."""
    q, worker_id, sink = queue(), f"runner-{new_id()[-6:]}", tmp_path / "effects.log"
    sink.touch()
    repo = Path(__file__).parents[2]

    def start_runner(log_name: str, *, hang: bool) -> subprocess.Popen[bytes]:
        command = [str(Path(sys.executable).parent / "controlplane"), "runner", "--url", stack.url]
        command += ["--queue", q, "--worker-id", worker_id, "--workflows", "tests.gateway.crash_workflows:ALL"]
        command += ["--lease-seconds", "30", "--concurrency", "8"]
        environment = {**os.environ, "PYTHONPATH": str(repo), "CP_CRASH_SINK": str(sink)}
        environment["CP_WORKER_KEY"] = stack.keys["acme"]["worker"]
        if hang:
            environment["CP_CRASH_HANG"] = "1"
        log = (tmp_path / f"{log_name}.log").open("wb")
        return subprocess.Popen(command, stdout=log, stderr=log, cwd=repo, env=environment)

    async with stack.client() as admin, stack.client(role="approver") as approver:
        body = {"type": "all-operations", "queue": q, "workflow": {"name": "all-operations", "version": 1}}
        body["payload"] = {"label": "restart", "sleep_seconds": 0.2, "hang_in": "step"}
        ids = [(await admin.post("/v1/tasks", json=body)).json()["id"] for _ in range(3)]

        doomed = start_runner("doomed", hang=True)
        try:

            async def all_inside_the_slow_step() -> bool:
                assert doomed.poll() is None, (tmp_path / "doomed.log").read_text()[-2000:]
                effects = sink.read_text().splitlines()
                return all(f"started {task_id}:3" in effects for task_id in ids)

            await until(all_inside_the_slow_step, within=60)
            doomed.kill()
        finally:
            await asyncio.to_thread(doomed.wait, 10)
        killed_at_seq = await stack.services.store.last_seq()
        restarted = start_runner("restarted", hang=False)
        try:

            async def all_completed() -> bool:
                tasks = [(await admin.get(f"/v1/tasks/{task_id}")).json() for task_id in ids]
                for task in tasks:
                    for approval in task["approvals"]:
                        if approval["status"] == "pending":
                            await approver.post(f"/v1/approvals/{approval['id']}/approve")
                return all(task["status"] == "completed" for task in tasks)

            await until(all_completed, within=60)
        finally:
            restarted.terminate()
            await asyncio.to_thread(restarted.wait, 15)

    worker_log = await stack.services.store.read_subject(f"cp.acme.worker.{worker_id}", after_seq=killed_at_seq)
    registration = next(r for r in worker_log if isinstance(r.event, WorkerRegistered))
    assert registration.event.restarted
    for task_id in ids:
        history = await stack.services.store.read_subject(f"cp.acme.task.{task_id}")
        assert not any(isinstance(r.event, TaskLeaseExpired) for r in history), "no lease had to run out"
        [released] = [r for r in history if isinstance(r.event, TaskLeaseReleased)]
        reclaimed = next(r for r in history if r.seq > released.seq and isinstance(r.event, TaskClaimed))
        waited = (reclaimed.recorded_at - registration.recorded_at).total_seconds()
        assert waited <= RESUMED_WITHIN_SECONDS, f"task {task_id} resumed {waited:.3f} s after the restart"
        assert sum(isinstance(r.event, TaskCompleted) for r in history) == 1
        positions = Counter(r.event.index for r in history if isinstance(r.event, WorkflowOperationRecorded))
        assert set(positions.values()) == {1}, "no journal position is recorded twice"
    effects = sink.read_text().splitlines()
    for task_id in ids:
        keys = [f"{task_id}:{index}" for index in (0, 3, 6)]
        assert sorted(e for e in effects if e.startswith("done ") and task_id in e) == [f"done {k}" for k in keys]
        assert effects.count(f"started {keys[0]}") == 1, "a recorded step is replayed, not run again"
        assert effects.count(f"started {keys[1]}") == 2, "only the interrupted step runs again"


async def test_the_python_client_names_its_process_so_only_a_new_process_releases(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, keys = await new_org(stack)
    q = queue()
    async with AsyncClient(stack.url, api_key=keys["worker"]) as agent, client(stack, keys["submitter"]) as submitter:
        await agent.workers.register("agent", queue=q)
        await submit(submitter, q)
        claim = await agent.workers.claim("agent", queue=q, lease_seconds=LONG_LEASE)
        assert claim is not None
        await agent.workers.register("agent", queue=q)  # the same process again: nothing released
        await agent.workers.heartbeat_lease(claim)

        monkeypatch.setattr(operations, "INCARNATION", "another-process")  # as a restarted process has
        await agent.workers.register("agent", queue=q)
        with pytest.raises(Conflict):
            await agent.workers.heartbeat_lease(claim)
        assert (await agent.get(claim.task.id)).status == "pending"
