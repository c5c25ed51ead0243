"""Counts for dashboards and the operator metrics: an org's tasks and workers by status, and every
queue's open tasks and pending approvals."""

from __future__ import annotations

from datetime import datetime
from typing import Any, get_args

import msgspec

from core.domain.events import Priority, TaskStatus, WorkerStatus
from projections.read.scope import Reads


class QueueSummary(msgspec.Struct, frozen=True):
    """One queue's open tasks and pending approvals (``ReadModel.queue_summary``); org and queue are
    None on the row that sums every queue past the limit."""

    org: str | None
    queue: str | None
    pending: int
    running: int
    awaiting_approval: int
    parked: int
    approvals_pending: int
    oldest_waiting_since: datetime | None
    """Since when the longest-waiting claimable task (pending, not parked, not waiting for a signal or
    a time) has been claimable: the later of its last change and its ``not_before``."""
    oldest_approval_since: datetime | None


_QUEUE_SUMMARY = """
WITH open AS MATERIALIZED (
    SELECT org_id, id, queue, status, state->>'parked' IS NOT NULL AS parked,
        CASE WHEN status = 'pending' AND state->>'parked' IS NULL AND state->>'signal_wait' IS NULL
            AND (not_before IS NULL OR not_before <= now()) THEN greatest(updated_at, not_before) END AS waiting_since
    FROM tasks WHERE status IN ('pending', 'running', 'awaiting_approval')
), waiting_approvals AS (
    SELECT o.org_id, o.queue, count(*) AS approvals_pending, min(a.created_at) AS oldest_approval_since
    FROM approvals a JOIN open o ON a.org_id = o.org_id AND a.task_id = o.id
    WHERE a.status = 'pending' GROUP BY o.org_id, o.queue
), per_queue AS (
    SELECT org_id, queue,
        count(*) FILTER (WHERE status = 'pending') AS pending,
        count(*) FILTER (WHERE status = 'running') AS running,
        count(*) FILTER (WHERE status = 'awaiting_approval') AS awaiting_approval,
        count(*) FILTER (WHERE parked) AS parked,
        min(waiting_since) AS oldest_waiting_since,
        count(*) AS open
    FROM open GROUP BY org_id, queue
), ranked AS (
    SELECT p.*, coalesce(w.approvals_pending, 0) AS approvals_pending, w.oldest_approval_since,
        row_number() OVER (ORDER BY p.open DESC, p.org_id, p.queue) <= $1 AS named
    FROM per_queue p LEFT JOIN waiting_approvals w USING (org_id, queue)
)
SELECT CASE WHEN named THEN org_id END AS org, CASE WHEN named THEN queue END AS queue,
    sum(pending)::bigint AS pending, sum(running)::bigint AS running,
    sum(awaiting_approval)::bigint AS awaiting_approval, sum(parked)::bigint AS parked,
    sum(approvals_pending)::bigint AS approvals_pending,
    min(oldest_waiting_since) AS oldest_waiting_since, min(oldest_approval_since) AS oldest_approval_since
FROM ranked GROUP BY 1, 2
"""
"""The status list is spelled out (not a parameter) so the planner can use the partial index
``tasks_open``, whose predicate it must prove from the query's text."""


class SummaryReads(Reads):
    async def stats(self, org: str) -> dict[str, Any]:
        """Counts for dashboards; every known status and priority is present, zero or not."""
        by_status = dict.fromkeys(get_args(TaskStatus), 0)
        by_priority = dict.fromkeys(get_args(Priority), 0)
        workers = dict.fromkeys(get_args(WorkerStatus), 0)
        async with self._scoped(org) as conn:
            for row in await conn.fetch(
                "SELECT status, priority, count(*) AS n FROM tasks WHERE org_id = $1"
                " GROUP BY GROUPING SETS ((status), (priority))",
                org,
            ):
                if row["status"] is not None:
                    by_status[row["status"]] = row["n"]
                else:
                    by_priority[row["priority"]] = row["n"]
            for row in await conn.fetch(
                "SELECT status, count(*) AS n FROM workers WHERE org_id = $1 GROUP BY status", org
            ):
                workers[row["status"]] = row["n"]
        return {"tasks": {"by_status": by_status, "by_priority": by_priority}, "workers": {"by_status": workers}}

    async def queue_summary(self, limit: int) -> list[QueueSummary]:
        """Per org and queue with open tasks, in every org: open tasks by status, parked ones, pending
        approvals and the oldest claimable task and approval; the ``limit`` queues with the most open
        tasks by name, every other one summed into one row without org or queue. One statement over the
        open tasks only (the partial index ``tasks_open``), so its cost follows the backlog, not the
        history; the operator metrics run it at most once per few seconds."""
        async with self._across_orgs() as conn:
            await conn.execute("SET LOCAL statement_timeout = 2000")  # a slow database fails the scrape's gauges
            rows = await conn.fetch(_QUEUE_SUMMARY, limit)
        return [msgspec.convert(dict(row), QueueSummary) for row in rows]
