"""The HITL lifecycle under crashes: while tasks are submitted, worked and approved, the gateway, the
projector and the runner are each killed with SIGKILL and restarted. Afterwards every acknowledged
submit is in the log exactly once, every task has completed, no workflow operation was recorded
twice, and the read model equals a fresh rebuild of the log.

``make test`` runs it with ``CP_CHAOS_TASKS`` (default 150) tasks; ``make test-chaos`` with 1,000."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from controlplane.embedded import EmbeddedNats, free_port
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.seed import seed_org
from core.domain.events import TaskSubmitted, WorkflowOperationRecorded
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from projections.rebuild import rebuild
from tests.integration.test_projections import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

TASKS = int(os.environ.get("CP_CHAOS_TASKS", "150"))
QUEUE = "chaos"
REPO = Path(__file__).parents[2]
CONTROLPLANE = str(Path(sys.executable).parent / "controlplane")
RETRYABLE = (httpx.TransportError, httpx.HTTPStatusError)


class Processes:
    """The gateway, projector and runner as real processes, each killed and restarted on demand."""

    def __init__(self, nats_url: str, database_url: str, worker_key: str, logs: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        connection = ["--nats-url", nats_url, "--database-url", database_url]
        self.commands = {
            "gateway": [CONTROLPLANE, "gateway", *connection, "--port", str(self.port)],
            "projector": [CONTROLPLANE, "projector", *connection],
            "runner": [
                *(CONTROLPLANE, "runner", "--url", self.url, "--queue", QUEUE),
                *("--workflows", "tests.chaos.chaos_workflows:ALL", "--lease-seconds", "3", "--concurrency", "16"),
            ],
        }
        self.environment = {**os.environ, "PYTHONPATH": str(REPO), "CP_CHAOS_SINK": str(logs / "effects.log")}
        self.environment["CP_WORKER_KEY"] = worker_key
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            self.commands[name], stdout=log, stderr=log, cwd=REPO, env=self.environment, start_new_session=True
        )

    async def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.kill()
        await asyncio.to_thread(process.wait, 10)

    async def stop_all(self) -> None:
        for process in self.running.values():
            process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                await asyncio.to_thread(process.wait, 20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.running.clear()


async def retried(call: Callable[[], Awaitable[httpx.Response]], *, ok: tuple[int, ...]) -> httpx.Response:
    """A client that outlives a gateway crash: same request (same Idempotency-Key) until it is answered."""
    async with asyncio.timeout(60):
        while True:
            with contextlib.suppress(*RETRYABLE):
                response = await call()
                if response.status_code in ok:
                    return response
                if response.status_code < 500:
                    response.raise_for_status()
            await asyncio.sleep(0.2)


async def test_the_lifecycle_survives_killing_the_gateway_the_projector_and_the_runner(
    servers: tuple[EmbeddedNats, EmbeddedPostgres],
    log_and_database: tuple[JetStreamEventStore, asyncpg.Pool],
    tmp_path: Path,
) -> None:
    nats_server, postgres = servers
    store, pool = log_and_database
    keys = await seed_org(CommandHandler(store), "acme", ("submitter", "worker", "approver"))
    processes = Processes(nats_server.url, postgres.dsn, keys["worker"], tmp_path)
    (tmp_path / "effects.log").touch()
    for name in ("projector", "gateway", "runner"):
        processes.start(name)

    acknowledged: dict[int, str] = {}
    submitted_enough = {name: asyncio.Event() for name in ("gateway", "projector", "runner")}

    def client(role: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=processes.url, headers={"Authorization": f"Bearer {keys[role]}"}, timeout=10)

    async def submit_all() -> None:
        slots = asyncio.Semaphore(8)
        async with client("submitter") as submitter:

            async def submit(number: int) -> None:
                async with slots:
                    body = {"type": "chaos", "queue": QUEUE, "workflow": {"name": "chaos", "version": 1}}
                    headers = {"Idempotency-Key": f"chaos-{number}"}
                    response = await retried(lambda: submitter.post("/v1/tasks", json=body, headers=headers), ok=(201,))
                    acknowledged[number] = response.json()["id"]
                    for share, name in ((0.25, "gateway"), (0.5, "projector"), (0.75, "runner")):
                        if len(acknowledged) >= share * TASKS:
                            submitted_enough[name].set()

            await asyncio.gather(*(submit(number) for number in range(TASKS)))

    async def approve_until(done: asyncio.Event) -> None:
        async with client("approver") as approver:
            while not done.is_set():
                with contextlib.suppress(*RETRYABLE):
                    inbox = await approver.get("/v1/approvals", params={"status": "pending", "limit": 500})
                    for approval in inbox.json()["items"] if inbox.status_code == 200 else []:
                        await approver.post(f"/v1/approvals/{approval['id']}/approve")  # 409 if decided: fine
                await asyncio.sleep(0.2)

    recovery: dict[str, float] = {}

    async def recovered(name: str) -> None:
        """Until the restarted process does its job again: the gateway answers ready, the projector has
        folded everything logged before its restart, the runner has completed a task."""
        target = await store.last_seq()
        worker = f"/v1/workers/runner-{processes.running[name].pid}"
        async with client("submitter") as probe, asyncio.timeout(90):
            while True:
                with contextlib.suppress(*RETRYABLE):
                    match name:
                        case "gateway":
                            if (await probe.get("/readyz")).status_code == 200:
                                return
                        case "projector":
                            if min((await _checkpoints(pool)).values()) >= target:
                                return
                        case "runner":
                            found = await probe.get(worker)
                            if found.status_code == 200 and found.json()["tasks_completed"] >= 1:
                                return
                await asyncio.sleep(0.05)

    async def crash_each_in_turn() -> None:
        for name in ("gateway", "projector", "runner"):
            await submitted_enough[name].wait()
            killed_at = time.monotonic()
            await processes.kill(name)
            await asyncio.sleep(0.5)
            processes.start(name)
            await recovered(name)
            recovery[name] = time.monotonic() - killed_at

    async def all_completed() -> bool:
        async with client("submitter") as reader:
            for task_id in acknowledged.values():
                with contextlib.suppress(*RETRYABLE):
                    if (await reader.get(f"/v1/tasks/{task_id}")).json()["status"] == "completed":
                        continue
                return False
        return True

    finished = asyncio.Event()
    approving = asyncio.create_task(approve_until(finished))
    try:
        await asyncio.gather(submit_all(), crash_each_in_turn())
        async with asyncio.timeout(180):
            while not await all_completed():
                await asyncio.sleep(1)
    finally:
        finished.set()
        await approving
        await processes.stop_all()

    print(
        f"\nrecovery after SIGKILL ({TASKS} tasks; restarted 0.5 s after the kill): "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in recovery.items())
        + " (gateway: until ready; projector: until it folded everything logged before its restart; "
        "runner: until the new runner completed a task)"
    )
    assert len(acknowledged) == TASKS
    submitted: Counter[str] = Counter()
    for task_id in acknowledged.values():
        history = await store.read_subject(f"cp.acme.task.{task_id}")
        submitted[task_id] += sum(isinstance(r.event, TaskSubmitted) for r in history)
        positions = Counter(r.event.index for r in history if isinstance(r.event, WorkflowOperationRecorded))
        assert set(positions.values()) == {1}, f"{task_id}: an operation was recorded twice: {positions}"
    assert set(submitted.values()) == {1}, "every acknowledged submit is in the log exactly once"
    effects = set((tmp_path / "effects.log").read_text().split())
    assert effects >= {f"{task_id}:{index}" for task_id in acknowledged.values() for index in (0, 2)}

    # Durable timers fire with every process stopped (a killed runner's missed heartbeats): compare
    # the live read model and the rebuild only over a log that did not grow in between.
    for _ in range(5):
        processes.start("projector")
        last_seq = await store.last_seq()
        async with asyncio.timeout(60):
            while min((await _checkpoints(pool)).values()) < last_seq:
                await asyncio.sleep(0.2)
        await processes.stop_all()
        live = await snapshot(pool, "acme")
        if await store.last_seq() != last_seq:
            continue
        await rebuild(pool, store.nc, None, lambda done, total: None)
        if await store.last_seq() == last_seq:
            break
    else:
        pytest.fail("timers kept firing: no quiet moment to compare the read model with a rebuild")
    assert await snapshot(pool, "acme") == live, "the read model equals a fresh rebuild of the log"


async def _checkpoints(pool: asyncpg.Pool) -> dict[str, Any]:
    return {row["projection"]: row["seq"] for row in await pool.fetch("SELECT projection, seq FROM checkpoints")}
