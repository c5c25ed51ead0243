"""The gateway's read side: queries over the projections' tables.

Every org-scoped query is walled twice. It filters ``org_id`` explicitly, and it runs in a read-only
transaction as ``cp_reader`` (``set_config('role', …, true)`` is ``SET LOCAL ROLE``: superusers bypass
row-level security, the reader role does not) with ``cp.org`` set, so the tables' RLS policy hides
every other org's rows even from a query that forgot its filter. Where the role cannot be used (see
``projections.schema``) the explicit filter is the wall and a warning says so once."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from datetime import date, datetime
from typing import Any, TypeVar, get_args

import asyncpg
import msgspec

from core.domain.environments import Environment
from core.domain.events import TERMINAL_STATUSES, Priority, TaskStatus, WorkerStatus
from core.domain.schedules import Schedule
from core.domain.task import Approval, Task
from core.domain.worker import Worker
from projections.folds import environment_from_row
from projections.schema import (
    NOTIFY_CHANNEL,
    READER_ROLE,
    effective_checkpoints,
    fetch_checkpoints,
    layout_of,
    parse_checkpoint_key,
)

log = logging.getLogger(__name__)
_SCHEDULE = msgspec.json.Decoder(Schedule)

T = TypeVar("T")
MAX_PAGE = 500
USAGE_GROUPS = ("day", "model")
"""What usage can be grouped by, in the order items are sorted."""
MAX_USAGE_DAYS = 366

DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
)
"""What asyncpg raises while PostgreSQL is down or restarting, as opposed to a query it refused."""

_task_decoder = msgspec.json.Decoder(Task)
_approval_decoder = msgspec.json.Decoder(Approval)
_worker_decoder = msgspec.json.Decoder(Worker)
_cursor_decoder = msgspec.json.Decoder(tuple[datetime, str])


class ApiKeyRow(msgspec.Struct, frozen=True):
    id: str
    org_id: str
    name: str
    roles: tuple[str, ...]
    secret_sha256: str
    created_at: datetime
    revoked_at: datetime | None


def encode_cursor(created_at: datetime, item_id: str) -> str:
    """Opaque to clients: the position after the last item of a page, in (created_at, id) order."""
    return base64.urlsafe_b64encode(msgspec.json.encode((created_at, item_id))).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        return _cursor_decoder.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, msgspec.DecodeError):  # binascii.Error is a ValueError
        raise ValueError(f"invalid cursor {cursor[:64]!r}: pass back the next_cursor of a previous page") from None


class _Where:
    """``WHERE`` conditions with numbered parameters; ``{0}``, ``{1}`` … in a condition stand for its values."""

    def __init__(self) -> None:
        self.args: list[Any] = []
        self._conditions: list[str] = []

    @classmethod
    def matching(cls, org: str, **equal: Any) -> _Where:
        """``org_id = org`` and ``column = value`` for every value that is not None."""
        where = cls()
        where.add("org_id = {0}", org)
        for column, value in equal.items():
            if value is not None:
                where.add(f"{column} = {{0}}", value)
        return where

    def add(self, condition: str, *values: Any) -> None:
        first = len(self.args) + 1
        self.args.extend(values)
        self._conditions.append(condition.format(*(f"${first + i}" for i in range(len(values)))))

    def __str__(self) -> str:
        return " AND ".join(self._conditions) or "true"


def _shard_count(checkpoint_key: str) -> int | None:
    """How many shards the layout of a checkpoint row has; None for an unsharded projection's row."""
    _, shard = parse_checkpoint_key(checkpoint_key)
    return None if shard is None else shard.count


def check_usage_query(start: date, end: date, group_by: tuple[str, ...]) -> None:
    """Raises ValueError, saying what to send instead, unless :meth:`ReadModel.usage` can answer."""
    unknown = [key for key in group_by if key not in USAGE_GROUPS]
    if unknown or not group_by:
        wrong = f"unknown group_by {', '.join(map(repr, unknown))}" if unknown else "group_by is empty"
        raise ValueError(f"{wrong}: send a comma-separated list of {', '.join(USAGE_GROUPS)}")
    if start > end:
        raise ValueError(f"from ({start}) is after to ({end})")
    days = (end - start).days + 1
    if days > MAX_USAGE_DAYS:
        raise ValueError(f"from {start} to {end} is {days} days; ask for at most {MAX_USAGE_DAYS} at a time")


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


class ReadModel:
    """Queries for the gateway. One instance per process; ``close`` releases its LISTEN connection."""

    def __init__(self, pool: asyncpg.Pool, *, poll_interval: float = 0.5) -> None:
        """``poll_interval``: how often ``wait_for`` re-reads checkpoints when no notification came
        (the listening connection may be reconnecting)."""
        self._pool = pool
        self._poll_interval = poll_interval
        self._use_role: bool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listen_lock = asyncio.Lock()
        self._seen: dict[str, int] = {}
        self._tick: asyncio.Future[None] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool it reads from; a projector or rebuild in the same process may write through it
        (a running projector holds one of its connections per projection)."""
        return self._pool

    async def close(self) -> None:
        if self._listener is not None:
            with suppress(Exception):
                await self._listener.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            await self._pool.release(self._listener)
            self._listener = None

    async def ping(self) -> None:
        """Raises unless PostgreSQL answers (for readiness checks)."""
        await self._pool.fetchval("SELECT 1")

    # --- tasks and approvals ----------------------------------------------------------------------

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
        where = _Where.matching(org, status=status, queue=queue, priority=priority, workflow_name=workflow)
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
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SET LOCAL cp.projector = 'on'")  # the system's own view, across orgs
            checkpoints = await fetch_checkpoints(conn)
            rows = await conn.fetch(
                "SELECT org_id, state, seq FROM tasks WHERE NOT (status = ANY($1::text[]))", sorted(TERMINAL_STATUSES)
            )
        checkpoint = effective_checkpoints(checkpoints).get("tasks", 0)
        return [(row["org_id"], _task_decoder.decode(row["state"]), row["seq"]) for row in rows], checkpoint

    async def live_workers(self) -> list[tuple[str, str]]:
        """``(org, worker id)`` of every worker not offline or failed, in every org: those whose
        liveness timers matter."""
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute("SET LOCAL cp.projector = 'on'")  # the system's own view, across orgs
            rows = await conn.fetch("SELECT org_id, id FROM workers WHERE status NOT IN ('offline', 'failed')")
        return [(row["org_id"], row["id"]) for row in rows]

    async def queue_summary(self, limit: int) -> list[QueueSummary]:
        """Per org and queue with open tasks, in every org: open tasks by status, parked ones, pending
        approvals and the oldest claimable task and approval; the ``limit`` queues with the most open
        tasks by name, every other one summed into one row without org or queue. One statement over the
        open tasks only (the partial index ``tasks_open``), so its cost follows the backlog, not the
        history; the operator metrics run it at most once per few seconds."""
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute("SET LOCAL cp.projector = 'on'")  # the system's own view, across orgs
            await conn.execute("SET LOCAL statement_timeout = 2000")  # a slow database fails the scrape's gauges
            rows = await conn.fetch(_QUEUE_SUMMARY, limit)
        return [msgspec.convert(dict(row), QueueSummary) for row in rows]

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
        where = _Where.matching(org, status=status, task_id=task_id)
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
        where: _Where,
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

    # --- workers and stats ------------------------------------------------------------------------

    async def get_worker(self, org: str, worker_id: str) -> tuple[Worker, int, int] | None:
        """``(worker, tasks completed, seq)``."""
        workers = await self._workers(org, _Where.matching(org, id=worker_id))
        return workers[0] if workers else None

    async def list_workers(
        self, org: str, queue: str | None = None, capability: str | None = None, available: bool | None = None
    ) -> list[tuple[Worker, int, int]]:
        """``(worker, tasks completed, seq)`` by id; ``available`` means status ``ready``."""
        where = _Where.matching(org, queue=queue)
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

    async def _workers(self, org: str, where: _Where) -> list[tuple[Worker, int, int]]:
        rows = await self._fetch(
            org, f"SELECT state, tasks_completed, seq FROM workers WHERE {where} ORDER BY id", *where.args
        )
        return [(_worker_decoder.decode(row["state"]), row["tasks_completed"], row["seq"]) for row in rows]

    async def spend_on(self, org: str, day: date) -> tuple[int, float]:
        """Prompt and completion tokens, and USD, the org's recorded LLM calls used on ``day`` (UTC)."""
        rows = await self._fetch(
            org,
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens, coalesce(sum(cost_usd), 0) AS cost"
            " FROM usage WHERE org_id = $1 AND day = $2",
            org,
            day,
        )
        return int(rows[0]["tokens"]), float(rows[0]["cost"])

    async def usage(
        self,
        org: str,
        *,
        start: date,
        end: date,
        group_by: tuple[str, ...] = USAGE_GROUPS,
        queue: str | None = None,
        workflow: str | None = None,
    ) -> list[dict[str, Any]]:
        """The org's recorded LLM calls from ``start`` to ``end`` (UTC days, both included), only those
        of tasks on ``queue`` and of tasks running the workflow named ``workflow`` when given: one item
        ``{day, model, calls, prompt_tokens, completion_tokens, cost_usd}`` per group, sorted by day then
        model. ``group_by`` names the keys grouped on (of :data:`USAGE_GROUPS`); a key it leaves out is
        None in every item (all the range's days, or all models, together). ``day`` is a ``date``,
        tokens are ints, ``cost_usd`` a float rounded to 6 decimals. Raises ValueError for an unknown or
        empty ``group_by``, ``start`` after ``end``, or more than :data:`MAX_USAGE_DAYS` days."""
        check_usage_query(start, end, group_by)
        keys = [key for key in USAGE_GROUPS if key in group_by]
        where = _Where.matching(org, queue=queue, workflow=workflow)
        where.add("day BETWEEN {0} AND {1}", start, end)
        rows = await self._fetch(
            org,
            f"SELECT {'day' if 'day' in keys else 'NULL::date AS day'},"
            f" {'model' if 'model' in keys else 'NULL::text AS model'},"
            " sum(calls) AS calls, sum(prompt_tokens) AS prompt_tokens,"
            " sum(completion_tokens) AS completion_tokens, round(sum(cost_usd), 6) AS cost_usd"
            f" FROM usage WHERE {where} GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}",
            *where.args,
        )
        return [
            {
                "day": row["day"],
                "model": row["model"],
                "calls": int(row["calls"]),
                "prompt_tokens": int(row["prompt_tokens"]),
                "completion_tokens": int(row["completion_tokens"]),
                "cost_usd": float(row["cost_usd"]),
            }
            for row in rows
        ]

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

    # --- environments ---------------------------------------------------------------------------

    async def list_environments(self, org: str) -> list[tuple[Environment, int]]:
        """The org's environments by name, each with the sequence of the environments' last event
        folded (the same for all of them: they are one aggregate)."""
        rows = await self._fetch(
            org,
            "SELECT name, queues, labels, created_at, updated_at, defined_by, seq FROM environments"
            " WHERE org_id = $1 ORDER BY name",
            org,
        )
        return [(environment_from_row(row), row["seq"]) for row in rows]

    async def get_environment(self, org: str, name: str) -> tuple[Environment, int] | None:
        rows = await self._fetch(
            org,
            "SELECT name, queues, labels, created_at, updated_at, defined_by, seq FROM environments"
            " WHERE org_id = $1 AND name = $2",
            org,
            name,
        )
        return (environment_from_row(rows[0]), rows[0]["seq"]) if rows else None

    async def environment_of_queue(self, org: str, queue: str) -> str | None:
        """The name of the environment holding ``queue``, as projected (None: none holds it)."""
        rows = await self._fetch(
            org, "SELECT name FROM environments WHERE org_id = $1 AND $2 = ANY(queues)", org, queue
        )
        return rows[0]["name"] if rows else None

    # --- schedules ------------------------------------------------------------------------------

    async def list_schedules(self, org: str, *, limit: int = 1000) -> list[tuple[Schedule, int]]:
        """The org's live schedules, oldest first, each with the sequence of its last event folded."""
        rows = await self._fetch(
            org,
            "SELECT state, seq FROM schedules WHERE org_id = $1 AND NOT deleted ORDER BY created_at, id LIMIT $2",
            org,
            limit,
        )
        return [(_SCHEDULE.decode(row["state"]), row["seq"]) for row in rows]

    async def get_schedule(self, org: str, schedule_id: str) -> tuple[Schedule, int] | None:
        rows = await self._fetch(
            org, "SELECT state, seq FROM schedules WHERE org_id = $1 AND id = $2 AND NOT deleted", org, schedule_id
        )
        return (_SCHEDULE.decode(rows[0]["state"]), rows[0]["seq"]) if rows else None

    # --- credentials and checkpoints --------------------------------------------------------------

    async def find_api_key(self, key_id: str) -> ApiKeyRow | None:
        """Not org-scoped: the org comes from the key itself."""
        row = await self._pool.fetchrow(
            "SELECT id, org_id, name, roles, secret_sha256, created_at, revoked_at FROM api_keys WHERE id = $1",
            key_id,
        )
        return None if row is None else msgspec.convert(dict(row), ApiKeyRow)

    async def checkpoints(self) -> dict[str, int]:
        """Each projection's committed sequence; for one run by shards, the one every shard reached."""
        return effective_checkpoints(await fetch_checkpoints(self._pool))

    async def checkpoint(self, projection: str) -> int:
        """The projection's committed sequence (with shards, their minimum) as last notified, read
        from the table when unknown: cheap enough for every long-poll iteration."""
        await self._listen()
        if self._listener is None or not layout_of(self._seen, projection):
            self._seen = await fetch_checkpoints(self._pool)
        return min(layout_of(self._seen, projection).values(), default=0)

    async def wait_for(self, projection: str, seq: int, timeout: float) -> bool:  # noqa: ASYNC109 (False, not an error)
        """Wait until ``projection`` (every shard of it, when sharded) has committed stream sequence
        ``seq`` (read-your-writes); False on timeout. Woken by ``pg_notify`` on one shared listening
        connection, with a poll every ``poll_interval`` in case a notification was missed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._tick is None:
            self._tick = loop.create_future()
        while True:
            tick = self._tick
            if await self.checkpoint(projection) >= seq:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait((tick,), timeout=min(remaining, self._poll_interval))
            if not tick.done():
                self._seen = await fetch_checkpoints(self._pool)

    async def _listen(self) -> None:
        async with self._listen_lock:
            if self._listener is not None:
                if not self._listener.is_closed():
                    return
                await self._pool.release(self._listener)
                self._listener = None
            conn = await self._pool.acquire()
            try:
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            except (OSError, asyncpg.PostgresError):
                log.warning("cannot LISTEN on %s; waits fall back to polling", NOTIFY_CHANNEL, exc_info=True)
                await self._pool.release(conn)
                return
            self._listener = conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        key, _, seq = payload.rpartition(":")
        with suppress(ValueError):
            self._note(key, int(seq))
        if self._tick is not None:
            tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
            tick.set_result(None)

    def _note(self, key: str, seq: int) -> None:
        """Take a notified checkpoint row. A row of another layout than the one known (the projection
        went from unsharded to shards, or changed its shard count) makes the known rows stale and says
        nothing of its sibling shards: forget the projection's rows, and the next read loads the new
        layout whole from the table (a layout's rows are always created together)."""
        projection, _ = parse_checkpoint_key(key)
        known = layout_of(self._seen, projection)
        if known and {_shard_count(other) for other in known} == {_shard_count(key)}:
            self._seen[key] = seq
            return
        for stale in [other for other in self._seen if parse_checkpoint_key(other)[0] == projection]:
            del self._seen[stale]

    # --- org scope --------------------------------------------------------------------------------

    async def _fetch(self, org: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._scoped(org) as conn:
            return await conn.fetch(sql, *args)

    @asynccontextmanager
    async def _scoped(self, org: str) -> AsyncIterator[asyncpg.Connection]:
        """A read-only transaction that only sees ``org`` (as ``cp_reader`` where possible)."""
        scope = (
            f"SELECT set_config('role', '{READER_ROLE}', true), set_config('cp.org', $1, true)"
            if await self._reader_role()
            else "SELECT set_config('cp.org', $1, true)"
        )
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(scope, org)
            yield conn

    async def _reader_role(self) -> bool:
        if self._use_role is None:
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        await conn.execute(f"SET LOCAL ROLE {READER_ROLE}")
                    self._use_role = True
                except asyncpg.PostgresError as exc:
                    log.warning(
                        "cannot SET ROLE %s (%s): reads rely on their explicit org filters%s",
                        READER_ROLE,
                        exc,
                        ""
                        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                        else "; connected as a superuser, row-level security is bypassed",
                    )
                    self._use_role = False
        return self._use_role
