"""Reads of workers: the registered ones with what each has completed, and the leases they hold."""

from __future__ import annotations

import msgspec

from core.domain.worker import Worker
from projections.read.scope import Reads, Where

_worker_decoder = msgspec.json.Decoder(Worker)


class WorkerReads(Reads):
    async def get_worker(self, org: str, worker_id: str) -> tuple[Worker, int, int] | None:
        """``(worker, tasks completed, seq)``."""
        workers = await self._workers(org, Where.matching(org, id=worker_id))
        return workers[0] if workers else None

    async def list_workers(
        self, org: str, queue: str | None = None, capability: str | None = None, available: bool | None = None
    ) -> list[tuple[Worker, int, int]]:
        """``(worker, tasks completed, seq)`` by id; ``available`` means status ``ready``."""
        where = Where.matching(org, queue=queue)
        if capability is not None:
            where.add("{0} = ANY(capabilities)", capability)
        if available is not None:
            where.add("status = 'ready'" if available else "status <> 'ready'")
        return await self._workers(org, where)

    async def tasks_in_hand(self, org: str) -> dict[str, list[str]]:
        """The ids of the running tasks each worker holds a lease on, by worker id."""
        rows = await self._fetch(
            org,
            "SELECT assigned_worker, id FROM tasks WHERE org_id = $1 AND status = 'running'"
            " AND assigned_worker IS NOT NULL ORDER BY created_at, id",
            org,
        )
        held: dict[str, list[str]] = {}
        for row in rows:
            held.setdefault(row["assigned_worker"], []).append(row["id"])
        return held

    async def leases_held_by(self, org: str, worker_id: str) -> dict[str, str]:
        """Task id -> lease id of each running task ``worker_id`` holds a lease on."""
        rows = await self._fetch(
            org,
            "SELECT id, state->'lease'->>'id' AS lease_id FROM tasks"
            " WHERE org_id = $1 AND status = 'running' AND assigned_worker = $2",
            org,
            worker_id,
        )
        return {row["id"]: row["lease_id"] for row in rows}

    async def live_workers(self) -> list[tuple[str, str]]:
        """``(org, worker id)`` of every worker not offline or failed, in every org: those whose
        liveness timers matter."""
        async with self._across_orgs() as conn:
            rows = await conn.fetch("SELECT org_id, id FROM workers WHERE status NOT IN ('offline', 'failed')")
        return [(row["org_id"], row["id"]) for row in rows]

    async def _workers(self, org: str, where: Where) -> list[tuple[Worker, int, int]]:
        rows = await self._fetch(
            org, f"SELECT state, tasks_completed, seq FROM workers WHERE {where} ORDER BY id", *where.args
        )
        return [(_worker_decoder.decode(row["state"]), row["tasks_completed"], row["seq"]) for row in rows]
