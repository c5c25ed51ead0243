"""Reads of tasks and approvals: single rows, pages in (created_at, id) order, and the open tasks the
claim index starts from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import msgspec

from core.domain.approvals import Approval
from core.domain.events import TERMINAL_STATUSES
from core.domain.task import Task
from projections.read.paging import MAX_PAGE, decode_cursor, encode_cursor
from projections.read.scope import Reads, Where
from projections.shards import effective_checkpoints, fetch_checkpoints

T = TypeVar("T")

_task_decoder = msgspec.json.Decoder(Task)
_approval_decoder = msgspec.json.Decoder(Approval)


class TaskReads(Reads):
    async def get_task(self, org: str, task_id: str) -> tuple[Task, int] | None:
        return await self._get(org, "tasks", task_id, _task_decoder.decode)

    async def list_tasks(
        self,
        org: str,
        status: str | None = None,
        queue: str | None = None,
        priority: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        *,
        workflow: str | None = None,
        newest_first: bool = False,
    ) -> tuple[list[tuple[Task, int]], str | None]:
        """A page of the org's tasks, oldest first (or newest first), and the cursor of the next page
        (None at the end); ``workflow`` is a workflow's name."""
        where = Where.matching(org, status=status, queue=queue, priority=priority, workflow_name=workflow)
        return await self._page(org, "tasks", where, limit, cursor, _task_decoder.decode, newest_first=newest_first)

    async def tasks_by_id(self, org: str, task_ids: Iterable[str]) -> dict[str, tuple[Task, int]]:
        """The org's tasks among ``task_ids`` (unknown ids are left out), in one query."""
        rows = await self._fetch(
            org, "SELECT state, seq FROM tasks WHERE org_id = $1 AND id = ANY($2::text[])", org, sorted(set(task_ids))
        )
        tasks = [(_task_decoder.decode(row["state"]), row["seq"]) for row in rows]
        return {task.id: (task, seq) for task, seq in tasks}

    async def open_tasks(self) -> tuple[list[tuple[str, Task, int]], int]:
        """Every task not yet terminal, in every org, as ``(org, task, seq)``, and the tasks
        projection's checkpoint, from one snapshot: where a follower of the log starts. When shards
        run it, that is the sequence every shard has reached; orgs of a shard that is further on
        already hold some later states, and a follower skips events older than the state it has."""
        async with self._across_orgs(isolation="repeatable_read") as conn:
            checkpoints = await fetch_checkpoints(conn)
            rows = await conn.fetch(
                "SELECT org_id, state, seq FROM tasks WHERE NOT (status = ANY($1::text[]))", sorted(TERMINAL_STATUSES)
            )
        checkpoint = effective_checkpoints(checkpoints).get("tasks", 0)
        return [(row["org_id"], _task_decoder.decode(row["state"]), row["seq"]) for row in rows], checkpoint

    async def get_approval(self, org: str, approval_id: str) -> tuple[Approval, int] | None:
        return await self._get(org, "approvals", approval_id, _approval_decoder.decode)

    async def list_approvals(
        self,
        org: str,
        status: str | None = None,
        task_id: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[tuple[Approval, int]], str | None]:
        """A page of approvals, oldest first. The pending inbox leaves out approvals of tasks that
        ended meanwhile (cancelled, timed out…): nobody can decide those any more."""
        where = Where.matching(org, status=status, task_id=task_id)
        if status == "pending":
            where.add(
                "NOT EXISTS (SELECT FROM tasks t WHERE t.org_id = approvals.org_id AND t.id = approvals.task_id"
                " AND t.status = ANY({0}::text[]))",
                sorted(TERMINAL_STATUSES),
            )
        return await self._page(org, "approvals", where, limit, cursor, _approval_decoder.decode)

    async def _get(self, org: str, table: str, item_id: str, decode: Callable[[str], T]) -> tuple[T, int] | None:
        rows = await self._fetch(org, f"SELECT state, seq FROM {table} WHERE org_id = $1 AND id = $2", org, item_id)
        return (decode(rows[0]["state"]), rows[0]["seq"]) if rows else None

    async def _page(
        self,
        org: str,
        table: str,
        where: Where,
        limit: int,
        cursor: str | None,
        decode: Callable[[str], T],
        *,
        newest_first: bool = False,
    ) -> tuple[list[tuple[T, int]], str | None]:
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
        if cursor is not None:
            where.add(f"(created_at, id) {'<' if newest_first else '>'} ({{0}}, {{1}})", *decode_cursor(cursor))
        order = "created_at DESC, id DESC" if newest_first else "created_at, id"
        rows = await self._fetch(
            org,
            f"SELECT state, seq, created_at, id FROM {table} WHERE {where}"
            f" ORDER BY {order} LIMIT ${len(where.args) + 1}",
            *where.args,
            limit + 1,
        )
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
        return [(decode(row["state"]), row["seq"]) for row in page], next_cursor
