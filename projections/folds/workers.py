"""The ``workers`` projection: a row per registered worker, and how many tasks each worker id has
completed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import asyncpg
import msgspec

from core.domain.events import TaskCompleted
from core.domain.records import RecordedEvent
from core.domain.worker import WORKER, WorkerState
from projections.folds.cache import BatchStates
from projections.folds.projection import StateProjection, address_of
from projections.folds.rows import Upsert, to_json
from projections.folds.tables import AggregateKey, Folded, JsonStateTable, key_arrays

_WORKERS = Upsert(
    "workers",
    key=("org_id", "id"),
    columns=(
        ("org_id", "text"),
        ("id", "text"),
        ("queue", "text"),
        ("capabilities", "text[]"),
        ("status", "text"),
        ("last_heartbeat_at", "timestamptz"),
        ("state", "jsonb"),
        ("seq", "bigint"),
    ),
    on_insert=(
        (
            "tasks_completed",
            "coalesce((SELECT c.tasks_completed FROM worker_counters c"
            " WHERE c.org_id = r.org_id AND c.worker_id = r.id), 0)",
        ),
    ),
)


class WorkerTable(JsonStateTable[WorkerState]):
    """A row per registered worker; deregistration (state None) deletes it."""

    decider = WORKER
    table = "workers"
    decoder = msgspec.json.Decoder(WorkerState)

    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[WorkerState]]) -> None:
        gone = [key for key, item in folded.items() if item.state is None]
        if gone:
            await conn.execute(
                "DELETE FROM workers WHERE (org_id, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                *key_arrays(gone),
            )
        await _WORKERS(
            conn,
            [
                (org, w.id, w.queue, w.capabilities, w.status, w.last_heartbeat_at, to_json(w), item.seq)
                for (org, _), item in folded.items()
                if (w := item.state) is not None
            ],
        )


_COUNT_COMPLETIONS = """
WITH counted AS (
    INSERT INTO worker_counters (org_id, worker_id, tasks_completed)
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[])
    ON CONFLICT (org_id, worker_id)
        DO UPDATE SET tasks_completed = worker_counters.tasks_completed + excluded.tasks_completed
    RETURNING org_id, worker_id, tasks_completed
)
UPDATE workers w SET tasks_completed = c.tasks_completed FROM counted c WHERE w.org_id = c.org_id AND w.id = c.worker_id
"""


class WorkersProjection(StateProjection):
    """Workers, plus how many tasks each worker id has completed (counted from ``TaskCompleted``, which
    lives on the task's subject, so this projection reads task events too)."""

    def __init__(self) -> None:
        super().__init__("workers", ("workers", "worker_counters"), {"worker": WorkerTable()})

    def reads(self, aggregate: str) -> bool:
        return aggregate in ("worker", "task")

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], states: BatchStates | None = None
    ) -> int:
        failures = await super().apply(conn, events, states)
        completed = Counter(
            (address_of(item.subject).org, item.event.worker_id)
            for item in events
            if isinstance(item.event, TaskCompleted)
        )
        if completed:
            orgs, workers = key_arrays(list(completed))
            await conn.execute(_COUNT_COMPLETIONS, orgs, workers, list(completed.values()))
        return failures


PROJECTION = WorkersProjection()
