"""A hand-written PostgreSQL task queue with the HTTP subset of our API that bench/lifecycle.py drives:
the baseline our control plane is measured against (issue 15).

One process: Starlette on uvicorn with uvloop (the gateway's own HTTP stack, so the comparison is of what
happens behind the HTTP layer), an asyncpg pool, and one more connection that LISTENs. Its tables live
in a database of their own on whatever PostgreSQL server ``--database-url`` names.

- Claims: ``SELECT ... FOR UPDATE SKIP LOCKED`` on a partial index, priority then age, in the same
  statement as the ``UPDATE`` that takes the lease; a lease is an id and an expiry column, and a task
  whose lease expired is claimable again (checked by the claim itself, no timer).
- ``block_ms``: a claim that finds nothing waits to be woken by ``NOTIFY task_ready`` (a trigger sends
  it when a task becomes pending, after its transaction commits), one waiter per notification.
- ``GET /v1/events?types=ApprovalRequested``: SSE fed by ``NOTIFY approval_requested`` (a trigger on
  the approvals table).

What it does not do, unlike the control plane: no event log (a row is updated in place: no history,
no audit, no replay, no state-at-sequence), no optimistic concurrency beyond the row lock, no
idempotency keys, no durable timers (lease expiry is noticed only by the next claim; no approval
timeouts, escalation, retries with backoff or deadlines), no projections or read models to keep, no
policy decision on submit, one approver decides (no quorum), no SSE resume (``Last-Event-ID``), no
rate limits, no request validation beyond what the queries need, and no reconnect if the LISTEN
connection drops.

    BASELINE_DATABASE_URL=postgresql://... BASELINE_KEYS='{"<key>": ["acme", "worker"], ...}' \\
        .venv/bin/python bench/baseline_queue.py --port 8099
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

KEYS_ENV = "BASELINE_KEYS"
"""JSON ``{api key: [org, role]}``: keys travel in the environment, never on the command line."""
DATABASE_URL_ENV = "BASELINE_DATABASE_URL"
"""A database of its own (the tables are created); it may hold a password, so not an argument either."""
PRIORITIES = {"critical": 0, "high": 1, "normal": 2, "low": 3}
PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}
KEEPALIVE_SECONDS = 15.0
MAX_BLOCK_MS = 30_000

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS versions;
CREATE SEQUENCE IF NOT EXISTS arrivals;
CREATE TABLE IF NOT EXISTS tasks (
    id text PRIMARY KEY,
    org text NOT NULL,
    queue text NOT NULL,
    type text NOT NULL,
    payload jsonb,
    priority smallint NOT NULL,
    position bigint NOT NULL DEFAULT nextval('arrivals'),
    status text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    worker_id text,
    claimed_by text,
    lease_id text,
    lease_expires_at timestamptz,
    result jsonb,
    seq bigint NOT NULL DEFAULT nextval('versions'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);
-- Only claimable-or-running rows are in it: the claim's ORDER BY ... LIMIT 1 reads its head.
CREATE INDEX IF NOT EXISTS tasks_claimable ON tasks (org, queue, priority, position)
    WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS tasks_by_queue ON tasks (org, queue, position);
CREATE TABLE IF NOT EXISTS approvals (
    id text PRIMARY KEY,
    task_id text NOT NULL REFERENCES tasks (id),
    org text NOT NULL,
    queue text NOT NULL,
    status text NOT NULL,
    reason text NOT NULL,
    requested_by text NOT NULL,
    requested_by_actor text NOT NULL,
    decided_by text,
    comment text,
    seq bigint NOT NULL DEFAULT nextval('versions'),
    created_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz
);
CREATE INDEX IF NOT EXISTS approvals_by_task ON approvals (task_id);
CREATE OR REPLACE FUNCTION notify_task_ready() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_ready', NEW.org || '/' || NEW.queue);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER task_ready AFTER INSERT OR UPDATE OF status ON tasks
    FOR EACH ROW WHEN (NEW.status = 'pending') EXECUTE FUNCTION notify_task_ready();
CREATE OR REPLACE FUNCTION notify_approval_requested() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('approval_requested', json_build_object(
        'type', 'ApprovalRequested', 'seq', NEW.seq, 'org', NEW.org, 'queue', NEW.queue,
        'aggregate', 'task', 'aggregate_id', NEW.task_id, 'approval_id', NEW.id, 'reason', NEW.reason,
        'requested_by', NEW.requested_by, 'at', NEW.created_at)::text);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER approval_requested AFTER INSERT ON approvals
    FOR EACH ROW EXECUTE FUNCTION notify_approval_requested();
"""

APPROVALS_OF_TASK = """
    (SELECT coalesce(json_agg(json_build_object(
        'id', a.id, 'task_id', a.task_id, 'status', a.status, 'reason', a.reason,
        'requested_by', a.requested_by, 'decided_by', a.decided_by, 'comment', a.comment,
        'created_at', a.created_at, 'decided_at', a.decided_at, 'seq', a.seq) ORDER BY a.seq), '[]'::json)
     FROM approvals a WHERE a.task_id = t.id) AS approvals
"""
TASK_FIELDS = (
    "t.id, t.org, t.queue, t.type, t.payload, t.priority, t.status, t.attempts, t.worker_id, t.claimed_by,"
    " t.lease_id, t.lease_expires_at, t.result, t.seq, t.created_at, t.updated_at, t.completed_at"
)
TASK_COLUMNS = f"{TASK_FIELDS}, {APPROVALS_OF_TASK}"
SUBMIT = f"""
    WITH t AS (
        INSERT INTO tasks (id, org, queue, type, payload, priority, status)
        VALUES ($1, $2, $3, $4, $5, $6, 'pending') RETURNING *
    )
    SELECT {TASK_FIELDS}, '[]'::json AS approvals FROM t
"""
CLAIM = f"""
    WITH next AS (
        SELECT id FROM tasks
        WHERE org = $1 AND queue = $2
          AND (status = 'pending' OR (status = 'running' AND lease_expires_at < now()))
        ORDER BY priority, position
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ), t AS (
        UPDATE tasks SET status = 'running', worker_id = $3, claimed_by = $4, lease_id = $5,
            lease_expires_at = now() + $6 * interval '1 second', attempts = tasks.attempts + 1,
            seq = nextval('versions'), updated_at = now()
        FROM next WHERE tasks.id = next.id
        RETURNING tasks.*
    )
    SELECT {TASK_COLUMNS} FROM t
"""
LEASE_HELD = """
    id = $1 AND org = $2 AND status = 'running' AND lease_id = $3 AND worker_id = $4 AND claimed_by = $5
    AND lease_expires_at > now()
"""
HEARTBEAT = f"""
    UPDATE tasks SET lease_expires_at = now() + $6 * interval '1 second', seq = nextval('versions'),
        updated_at = now()
    WHERE {LEASE_HELD}
    RETURNING lease_id, lease_expires_at, seq
"""
REQUEST_APPROVAL = f"""
    WITH t AS (
        UPDATE tasks SET status = 'awaiting_approval', lease_id = NULL, lease_expires_at = NULL,
            worker_id = NULL, claimed_by = NULL, seq = nextval('versions'), updated_at = now()
        WHERE {LEASE_HELD}
        RETURNING id, org, queue
    )
    INSERT INTO approvals (id, task_id, org, queue, status, reason, requested_by, requested_by_actor)
    SELECT t.id || '-' || (SELECT count(*) + 1 FROM approvals a WHERE a.task_id = t.id), t.id, t.org, t.queue,
        'pending', $6, $4, $5
    FROM t
    RETURNING *
"""
APPROVE = """
    WITH a AS (
        UPDATE approvals SET status = 'approved', decided_by = $3, comment = $4, decided_at = now(),
            seq = nextval('versions')
        WHERE id = $1 AND org = $2 AND status = 'pending' AND requested_by_actor <> $3
        RETURNING *
    ), t AS (
        UPDATE tasks SET status = 'pending', seq = nextval('versions'), updated_at = now()
        FROM a WHERE tasks.id = a.task_id AND tasks.status = 'awaiting_approval'
        RETURNING tasks.id
    )
    SELECT * FROM a
"""
"""The task's update runs although nothing reads it: PostgreSQL runs every data-modifying WITH to completion."""
APPROVAL_STATE = "SELECT status, requested_by_actor FROM approvals WHERE id = $1 AND org = $2"
COMPLETE = f"""
    WITH t AS (
        UPDATE tasks SET status = 'completed', result = $6, lease_id = NULL, lease_expires_at = NULL,
            seq = nextval('versions'), updated_at = now(), completed_at = now()
        WHERE {LEASE_HELD}
        RETURNING *
    )
    SELECT {TASK_COLUMNS} FROM t
"""
LIST = f"""
    SELECT {TASK_COLUMNS} FROM tasks t
    WHERE t.org = $1 AND ($2::text IS NULL OR t.queue = $2)
    ORDER BY t.position LIMIT $3
"""


class Problem(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def problem(status: int, detail: str) -> Response:
    body = {"type": "about:blank", "title": detail, "status": status, "detail": detail}
    return Response(orjson.dumps(body), status, media_type="application/problem+json")


def ok(document: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status, media_type="application/json")


@dataclass(frozen=True)
class Caller:
    org: str
    role: str
    actor: str


def task_view(row: asyncpg.Record, viewer: str) -> dict[str, Any]:
    lease = None
    if row["status"] == "running":
        lease = {"id": row["lease_id"] if row["claimed_by"] == viewer else None, "expires_at": row["lease_expires_at"]}
    return {
        "id": row["id"],
        "org": row["org"],
        "queue": row["queue"],
        "type": row["type"],
        "payload": row["payload"],
        "priority": PRIORITY_NAMES[row["priority"]],
        "status": row["status"],
        "retries": max(0, row["attempts"] - 1),
        "assigned_worker": row["worker_id"] if row["status"] == "running" else None,
        "lease": lease,
        "result": row["result"],
        "approvals": row["approvals"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "completed_at": row["completed_at"],
        "seq": row["seq"],
    }


def approval_view(row: asyncpg.Record) -> dict[str, Any]:
    decisions = []
    if row["decided_by"] is not None:
        decisions = [
            {"by": row["decided_by"], "decision": "approve", "comment": row["comment"], "at": row["decided_at"]}
        ]
    return {
        "id": row["id"],
        "task_id": row["task_id"],
        "status": row["status"],
        "reason": row["reason"],
        "requested_by": row["requested_by"],
        "approvers": ["role:approver"],
        "quorum": 1,
        "decisions": decisions,
        "created_at": row["created_at"],
        "decided_at": row["decided_at"],
        "seq": row["seq"],
    }


class Wakeups:
    """Claimers waiting on a queue, woken one per task that became claimable there.

    A claimer takes a ticket *before* it queries, so a task committed between its query and its wait
    still wakes it (or another ticket holder). A claimer that was woken but found its task by its own
    query passes the wake-up on: it was meant for another task."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def ticket(self, queue: str) -> asyncio.Future[None]:
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(queue, deque()).append(ticket)
        return ticket

    def wake_one(self, queue: str) -> None:
        waiting = self._waiting.get(queue)
        while waiting:
            ticket = waiting.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return

    async def wait(self, queue: str, ticket: asyncio.Future[None], seconds: float) -> bool:
        """True once woken; False, the ticket given up, after ``seconds``."""
        try:
            await asyncio.wait_for(ticket, seconds)
        except TimeoutError:
            self.give_up(queue, ticket)
            return False
        except BaseException:  # the request was cancelled
            self.give_up(queue, ticket)
            raise
        return True

    def give_up(self, queue: str, ticket: asyncio.Future[None]) -> None:
        """The claimer needs its ticket no more; a wake-up it got goes to the next claimer."""
        woken = ticket.done() and not ticket.cancelled()
        if not ticket.done():
            ticket.cancel()
        waiting = self._waiting.get(queue)
        if waiting is not None and ticket in waiting:
            waiting.remove(ticket)
        if woken:
            self.wake_one(queue)


class Subscribers:
    """Open ``/v1/events`` streams: each gets the ApprovalRequested events of its org (and queue)."""

    def __init__(self) -> None:
        self._streams: set[tuple[str, str | None, asyncio.Queue[tuple[int, bytes]]]] = set()

    @asynccontextmanager
    async def subscribe(self, org: str, queue: str | None) -> AsyncIterator[asyncio.Queue[tuple[int, bytes]]]:
        inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        entry = (org, queue, inbox)
        self._streams.add(entry)
        try:
            yield inbox
        finally:
            self._streams.discard(entry)

    def publish(self, payload: str) -> None:
        event = orjson.loads(payload)
        data = payload.encode()
        for org, queue, inbox in self._streams:
            if org == event["org"] and queue in (None, event["queue"]):
                inbox.put_nowait((event["seq"], data))


class Baseline:
    def __init__(self, database_url: str, keys: dict[str, tuple[str, str]]) -> None:
        self.database_url = database_url
        self.keys = {key: Caller(org, role, f"key:{key[:8]}") for key, (org, role) in keys.items()}
        self.wakeups = Wakeups()
        self.subscribers = Subscribers()
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the service has not started"
        return self._pool

    async def start(self) -> None:
        async def codecs(connection: asyncpg.Connection) -> None:
            for name in ("json", "jsonb"):
                await connection.set_type_codec(
                    name, schema="pg_catalog", encoder=lambda value: orjson.dumps(value).decode(), decoder=orjson.loads
                )

        self._pool = await asyncpg.create_pool(self.database_url, min_size=4, max_size=16, init=codecs)
        async with self._pool.acquire() as connection:
            await connection.execute(SCHEMA)
        self._listener = await asyncpg.connect(self.database_url)
        await self._listener.add_listener("task_ready", lambda _c, _pid, _channel, queue: self.wakeups.wake_one(queue))
        await self._listener.add_listener(
            "approval_requested", lambda _c, _pid, _channel, event: self.subscribers.publish(event)
        )

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        if self._pool is not None:
            await self._pool.close()

    # --- HTTP -----------------------------------------------------------------------------------------

    def route(
        self, roles: set[str], handler: Callable[[Request, Caller], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            caller = self.keys.get(key) if scheme.lower() == "bearer" else None
            if caller is None:
                return problem(401, "a valid API key is required")
            if caller.role not in roles and caller.role != "admin":
                return problem(403, f"role {caller.role} may not do this")
            try:
                return await handler(request, caller)
            except Problem as exc:
                return problem(exc.status, exc.detail)

        return endpoint

    @staticmethod
    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            document = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            raise Problem(400, f"the body is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise Problem(422, "the body must be a JSON object")
        return document

    @staticmethod
    def field(document: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
        value = document.get(name, default)
        if type(value) is not kind:  # exactly: a bool is not an int here
            raise Problem(422, f"{name}: a {kind.__name__} is required")
        return value

    async def submit(self, request: Request, caller: Caller) -> Response:
        document = await self.body(request)
        priority = PRIORITIES.get(self.field(document, "priority", str, "normal"))
        if priority is None:
            raise Problem(422, f"priority: one of {', '.join(PRIORITIES)}")
        row = await self.pool.fetchrow(
            SUBMIT,
            str(uuid.uuid4()),
            caller.org,
            self.field(document, "queue", str, "default"),
            self.field(document, "type", str),
            document.get("payload"),
            priority,
        )
        return ok(task_view(row, caller.actor), 201)

    async def claim(self, request: Request, caller: Caller) -> Response:
        document = await self.body(request)
        worker_id = self.field(document, "worker_id", str)
        queue = self.field(document, "queue", str, "default")
        block_ms = self.field(document, "block_ms", int, 0)
        lease_seconds = self.field(document, "lease_seconds", int, 30)
        if not 0 <= block_ms <= MAX_BLOCK_MS or not 1 <= lease_seconds <= 86_400:
            raise Problem(422, f"block_ms: 0 to {MAX_BLOCK_MS}; lease_seconds: 1 to 86400")
        channel = f"{caller.org}/{queue}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            ticket = self.wakeups.ticket(channel)
            try:
                row = await self.pool.fetchrow(
                    CLAIM, caller.org, queue, worker_id, caller.actor, uuid.uuid4().hex, lease_seconds
                )
            except BaseException:
                self.wakeups.give_up(channel, ticket)
                raise
            remaining = deadline - loop.time()
            if row is not None or remaining <= 0:
                self.wakeups.give_up(channel, ticket)
                if row is None:
                    return Response(status_code=204)
                task = task_view(row, caller.actor)
                return ok({"task": task, "lease": task["lease"], "seq": row["seq"]})
            if not await self.wakeups.wait(channel, ticket, remaining):
                return Response(status_code=204)

    def lease_arguments(self, task_id: str, caller: Caller, document: dict[str, Any]) -> list[Any]:
        return [
            task_id,
            caller.org,
            self.field(document, "lease_id", str),
            self.field(document, "worker_id", str),
            caller.actor,
        ]

    async def heartbeat(self, request: Request, caller: Caller) -> Response:
        document = await self.body(request)
        arguments = self.lease_arguments(request.path_params["id"], caller, document)
        row = await self.pool.fetchrow(HEARTBEAT, *arguments, self.field(document, "lease_seconds", int, 30))
        if row is None:
            raise Problem(409, "the lease is not held")
        return ok({"lease": {"id": row["lease_id"], "expires_at": row["lease_expires_at"]}, "seq": row["seq"]})

    async def request_approval(self, request: Request, caller: Caller) -> Response:
        document = await self.body(request)
        arguments = self.lease_arguments(request.path_params["id"], caller, document)
        row = await self.pool.fetchrow(REQUEST_APPROVAL, *arguments, self.field(document, "reason", str))
        if row is None:
            raise Problem(409, "the lease is not held")
        return ok(approval_view(row), 201)

    async def approve(self, request: Request, caller: Caller) -> Response:
        document = await self.body(request)
        comment = self.field(document, "comment", str, "")
        approval_id = request.path_params["id"]
        row = await self.pool.fetchrow(APPROVE, approval_id, caller.org, caller.actor, comment)
        if row is not None:
            return ok(approval_view(row))
        state = await self.pool.fetchrow(APPROVAL_STATE, approval_id, caller.org)
        if state is None:
            raise Problem(404, f"no approval {approval_id}")
        if state["requested_by_actor"] == caller.actor:
            raise Problem(403, "the credential that asked may not decide")
        raise Problem(409, f"the approval is {state['status']}")

    async def complete(self, request: Request, caller: Caller) -> Response:
        document = await self.body(request)
        arguments = self.lease_arguments(request.path_params["id"], caller, document)
        row = await self.pool.fetchrow(COMPLETE, *arguments, document.get("result"))
        if row is None:
            raise Problem(409, "the lease is not held")
        return ok(task_view(row, caller.actor))

    async def list_tasks(self, request: Request, caller: Caller) -> Response:
        """Oldest first, without paging. ``min_seq`` is accepted and needs no wait: every write is in
        these tables once it has returned."""
        query = request.query_params
        try:
            limit = int(query.get("limit", "100"))
        except ValueError as exc:
            raise Problem(422, "limit is an integer") from exc
        if not 1 <= limit <= 500:
            raise Problem(422, "limit: 1 to 500")
        rows = await self.pool.fetch(LIST, caller.org, query.get("queue"), limit)
        return ok({"items": [task_view(row, caller.actor) for row in rows], "next_cursor": None})

    async def events(self, request: Request, caller: Caller) -> Response:
        if set(request.query_params.get("types", "ApprovalRequested").split(",")) != {"ApprovalRequested"}:
            raise Problem(422, "types: this baseline streams ApprovalRequested only")
        queue = request.query_params.get("queue")

        async def stream() -> AsyncIterator[bytes]:
            async with self.subscribers.subscribe(caller.org, queue) as inbox:
                yield b": connected\n\n"
                while True:
                    try:
                        seq, data = await asyncio.wait_for(inbox.get(), KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    yield b"id: %d\nevent: ApprovalRequested\ndata: %s\n\n" % (seq, data)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    def app(self) -> Starlette:
        async def healthz(request: Request) -> Response:
            return ok({"status": "ok"})

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        lease = {"worker"}
        routes = [
            Route("/healthz", healthz),
            Route("/v1/tasks", self.route({"submitter"}, self.submit), methods=["POST"]),
            Route("/v1/tasks", self.route({"submitter", "worker", "approver", "viewer"}, self.list_tasks)),
            Route("/v1/tasks/claim", self.route(lease, self.claim), methods=["POST"]),
            Route("/v1/tasks/{id}/heartbeat", self.route(lease, self.heartbeat), methods=["POST"]),
            Route("/v1/tasks/{id}/approval-requests", self.route(lease, self.request_approval), methods=["POST"]),
            Route("/v1/tasks/{id}/complete", self.route(lease, self.complete), methods=["POST"]),
            Route("/v1/approvals/{id}/approve", self.route({"approver"}, self.approve), methods=["POST"]),
            Route("/v1/events", self.route({"submitter", "worker", "approver", "viewer"}, self.events)),
        ]
        return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    keys = {key: (org, role) for key, (org, role) in orjson.loads(os.environ[KEYS_ENV]).items()}
    app = Baseline(os.environ[DATABASE_URL_ENV], keys).app()
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
