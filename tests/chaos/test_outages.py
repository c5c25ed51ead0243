"""Outages of one backing service: the other keeps its half of the product working, the clients are
told why in a 503, and everything recovers on its own when the service is back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from controlplane.embedded import EmbeddedNats
from controlplane.embedded_postgres import EmbeddedPostgres
from core.domain.commands import SYSTEM, SubmitTask
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from tests.gateway.conftest import serve_stack

pytestmark = pytest.mark.integration


async def until(check: Callable[[], Awaitable[bool]], within: float = 30) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.1)


def unavailable(response: httpx.Response, because: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert because in response.json()["detail"]


async def test_while_postgres_is_down_commands_claims_and_task_reads_work_and_lists_say_why(
    servers: tuple[EmbeddedNats, EmbeddedPostgres],
) -> None:
    nats_server, postgres = servers
    async with serve_stack(nats_server.url, postgres.dsn) as stack:
        stack.services.auth.cache_seconds = 0  # every request checks its key: against the log, now
        async with stack.client() as admin, stack.client(role="worker") as worker:
            body = {"type": "deploy", "queue": "outage"}
            before = (await admin.post("/v1/tasks", json=body)).json()
            assert (await worker.get("/v1/stats")).status_code == 200

            await asyncio.to_thread(postgres.stop)
            during = await admin.post("/v1/tasks", json=body)
            assert during.status_code == 201, during.text
            claimed = await worker.post("/v1/tasks/claim", json={"worker_id": "w1", "queue": "outage"})
            assert claimed.status_code == 200, claimed.text
            task_id, lease_id = claimed.json()["task"]["id"], claimed.json()["lease"]["id"]
            assert task_id == before["id"], "claim order holds without the read model"
            done = await worker.post(f"/v1/tasks/{task_id}/complete", json={"worker_id": "w1", "lease_id": lease_id})
            assert done.status_code == 200, done.text
            assert (await admin.get(f"/v1/tasks/{during.json()['id']}")).json()["status"] == "pending"
            unavailable(await admin.get("/v1/tasks", params={"queue": "outage"}), "read model (PostgreSQL)")
            unavailable(await admin.get("/readyz"), "postgres")

            await asyncio.to_thread(postgres.start)
            last = done.json()["seq"]

            async def caught_up() -> bool:
                listed = await admin.get("/v1/tasks", params={"queue": "outage", "min_seq": last})
                return listed.status_code == 200 and len(listed.json()["items"]) == 2

            await until(caught_up)
            listed = (await admin.get("/v1/tasks", params={"queue": "outage"})).json()["items"]
            assert {t["id"]: t["status"] for t in listed} == {before["id"]: "completed", during.json()["id"]: "pending"}
            assert (await admin.get("/readyz")).status_code == 200


async def test_while_nats_is_down_writes_say_why_and_everything_recovers_on_its_own(
    servers: tuple[EmbeddedNats, EmbeddedPostgres],
) -> None:
    nats_server, postgres = servers
    async with serve_stack(nats_server.url, postgres.dsn) as stack:
        stack.services.auth.cache_seconds = 0  # keys are checked against the read model meanwhile
        async with stack.client() as admin, stack.client(role="worker") as worker:
            body = {"type": "deploy", "queue": "outage"}
            first = (await admin.post("/v1/tasks", json=body)).json()
            assert (await worker.get("/v1/stats")).status_code == 200

            await asyncio.to_thread(nats_server.stop)
            unavailable(await admin.post("/v1/tasks", json=body), "event log (NATS)")
            listed = await admin.get("/v1/tasks", params={"queue": "outage", "min_seq": first["seq"]})
            assert [t["id"] for t in listed.json()["items"]] == [first["id"]], "reads from the read model go on"
            unavailable(await admin.get("/readyz"), "nats")

            await asyncio.to_thread(nats_server.start)

            async def accepts_writes() -> bool:
                return (await admin.post("/v1/tasks", json={**body, "queue": "after"})).status_code == 201

            await until(accepts_writes)
            # A task another process submits reaches this gateway's claims through the log again.
            store = await JetStreamEventStore.connect(nats_server.url)
            try:
                await CommandHandler(store).handle(
                    "acme", SubmitTask(task_id="elsewhere", task_type="x", queue="late"), actor=SYSTEM
                )
            finally:
                await store.close()
            claimed = await worker.post(
                "/v1/tasks/claim", json={"worker_id": "w1", "queue": "late", "block_ms": 10_000}
            )
            assert claimed.status_code == 200, claimed.text
            assert claimed.json()["task"]["id"] == "elsewhere"
            assert (await admin.get("/readyz")).status_code == 200
