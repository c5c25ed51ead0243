"""The ``tasks`` projection: a row per task, and a row per approval of it (the approvals inbox)."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from core.domain.events import PRIORITY_RANK
from core.domain.task import TaskState
from core.domain.task_decider import TASK
from projections.folds.projection import StateProjection
from projections.folds.rows import Upsert, to_json, upsert_together
from projections.folds.tables import AggregateKey, Folded, JsonStateTable

_TASKS = Upsert(
    "tasks",
    key=("org_id", "id"),
    columns=(
        ("org_id", "text"),
        ("id", "text"),
        ("queue", "text"),
        ("status", "text"),
        ("priority", "text"),
        ("priority_rank", "smallint"),
        ("required_capabilities", "text[]"),
        ("workflow_name", "text"),
        ("workflow_version", "int"),
        ("assigned_worker", "text"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
        ("not_before", "timestamptz"),
        ("state", "jsonb"),
        ("seq", "bigint"),
    ),
)
_APPROVALS = Upsert(
    "approvals",
    key=("org_id", "id"),
    columns=(
        ("org_id", "text"),
        ("id", "text"),
        ("task_id", "text"),
        ("status", "text"),
        ("created_at", "timestamptz"),
        ("expires_at", "timestamptz"),
        ("decided_at", "timestamptz"),
        ("state", "jsonb"),
        ("seq", "bigint"),
    ),
    # Approval ids are chosen by the caller and unique per org in practice; should two tasks reuse
    # one, the first keeps the row, the same way in every rebuild.
    only_if="approvals.task_id = excluded.task_id",
)


class TaskTable(JsonStateTable[TaskState]):
    decider = TASK
    table = "tasks"
    decoder = msgspec.json.Decoder(TaskState)

    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[TaskState]]) -> None:
        tasks: list[tuple[Any, ...]] = []
        approvals: list[tuple[Any, ...]] = []
        for (org, _), item in folded.items():
            task = item.state
            if task is None:  # events of a task never submitted: nothing to show
                continue
            tasks.append(
                (
                    org,
                    task.id,
                    task.queue,
                    task.status,
                    task.priority,
                    PRIORITY_RANK[task.priority],
                    task.required_capabilities,
                    task.workflow.name if task.workflow else None,
                    task.workflow.version if task.workflow else None,
                    task.assigned_worker,
                    task.created_at,
                    task.updated_at,
                    task.not_before,
                    to_json(task),
                    item.seq,
                )
            )
            approvals.extend(
                (org, a.id, task.id, a.status, a.created_at, a.expires_at, a.decided_at, to_json(a), item.seq)
                for a in task.approvals
            )
        await upsert_together(conn, [(_TASKS, tasks), (_APPROVALS, approvals)])


PROJECTION = StateProjection("tasks", ("tasks", "approvals"), {"task": TaskTable()})
