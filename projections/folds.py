"""What each projection does with a batch of events: the tables it owns and how events fold into them.

Domain rules are never repeated here. Task, worker, org and key rows hold the state that core's pure
``evolve`` functions compute: a batch loads the current state of the aggregates it touches in one
query per table, folds its events in memory and writes each touched aggregate back once, with one
statement per table (``unnest`` arrays, not a round trip per row). That is what makes a rebuild fast,
and it makes live and rebuilt tables equal by construction: both are the same fold of the same log."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import cached_property
from typing import Any, Generic, TypeVar

import asyncpg
import msgspec

from core.domain.access import API_KEY, ORG, ApiKey, Org
from core.domain.decider import Decider
from core.domain.environments import ENVIRONMENTS, ENVIRONMENTS_AGGREGATE, Environment, Environments
from core.domain.events import (
    PRIORITY_RANK,
    Event,
    LlmCall,
    LlmUsage,
    TaskCompleted,
    TaskSubmitted,
    WorkflowOperationRecorded,
)
from core.domain.records import RecordedEvent
from core.domain.schedules import SCHEDULE, SCHEDULE_AGGREGATE, ScheduleState
from core.domain.task import TASK, TaskState
from core.domain.worker import WORKER, WorkerState

log = logging.getLogger(__name__)

S = TypeVar("S")
AggregateKey = tuple[str, str]
"""``(org, aggregate id)`` as in the subject ``cp.<org>.<aggregate>.<id>``."""

_encode = msgspec.json.Encoder().encode


NUL = "\x00"
NUL_STAND_IN = "\u2400"
"""PostgreSQL text and jsonb cannot hold U+0000, which commands accept inside strings; the read model
shows it as ␀ (U+2400), the same way in every fold, rather than refusing the event."""


def to_json(value: Any) -> str:
    """asyncpg passes ``jsonb`` parameters as text."""
    return _encode(value).decode()


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(NUL, NUL_STAND_IN)
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value


def storable_text(value: Any) -> Any:
    return value.replace(NUL, NUL_STAND_IN) if isinstance(value, str) and NUL in value else value


def storable_json(text: str) -> str:
    """JSON text jsonb accepts. The substring check is a cheap filter (it also matches an escaped
    backslash followed by ``u0000``); the rare hit re-encodes exactly."""
    return to_json(_without_nul(msgspec.json.decode(text))) if "\\u0000" in text else text


def address(subject: str) -> tuple[str, str, str]:
    """``(org, aggregate, id)`` of an event subject; the projector has checked its shape."""
    _, org, aggregate, aggregate_id = subject.split(".")
    return org, aggregate, aggregate_id


@dataclass(frozen=True)
class Upsert:
    """``INSERT … SELECT … FROM unnest(<one array per column>) ON CONFLICT DO UPDATE``: a whole batch
    of rows in one statement and one round trip. Rows are tuples in ``columns`` order; a ``text[]``
    column takes a Python sequence per row (sent as JSON, because ``unnest`` flattens arrays of arrays)."""

    table: str
    key: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]
    on_insert: tuple[tuple[str, str], ...] = ()
    """``(column, SQL expression over the row r)`` set by an insert and left alone by an update."""
    merge: tuple[tuple[str, str], ...] = ()
    """``(column, SQL expression)`` replacing ``excluded.<column>`` in the update."""
    only_if: str | None = None
    """Condition under which a conflicting row is updated."""

    @cached_property
    def sql(self) -> str:
        names = [name for name, _ in self.columns]
        params = ", ".join(
            f"${number}::{'jsonb' if sql_type == 'text[]' else sql_type}[]"
            for number, (_, sql_type) in enumerate(self.columns, start=1)
        )
        values = [
            f"ARRAY(SELECT jsonb_array_elements_text(r.{name}))" if sql_type == "text[]" else f"r.{name}"
            for name, sql_type in self.columns
        ]
        targets = names + [name for name, _ in self.on_insert]
        merged = dict(self.merge)
        updates = ", ".join(
            f"{name} = {merged.get(name, f'excluded.{name}')}" for name in names if name not in self.key
        )
        return (
            f"INSERT INTO {self.table} ({', '.join(targets)}) "
            f"SELECT {', '.join(values + [expression for _, expression in self.on_insert])} "
            f"FROM unnest({params}) AS r({', '.join(names)}) "
            f"ON CONFLICT ({', '.join(self.key)}) DO UPDATE SET {updates}"
            + (f" WHERE {self.only_if}" if self.only_if else "")
        )

    async def __call__(self, conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        arrays = [list(column) for column in zip(*rows, strict=True)]
        for index, (_, sql_type) in enumerate(self.columns):
            if sql_type == "text[]":
                arrays[index] = [storable_json(to_json(value)) for value in arrays[index]]
            elif sql_type == "jsonb":
                arrays[index] = [storable_json(value) for value in arrays[index]]
            elif sql_type == "text":
                arrays[index] = [storable_text(value) for value in arrays[index]]
        await conn.execute(self.sql, *arrays)


@dataclass(slots=True)
class Folded(Generic[S]):
    state: S
    seq: int
    """Stream sequence of the last event folded into ``state``."""


class StateTable(ABC, Generic[S]):
    """Where one aggregate type's state lives in the read model."""

    decider: Decider[S]

    @abstractmethod
    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, S]:
        """The stored state of those of ``keys`` that have a row."""

    @abstractmethod
    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[S]]) -> None:
        """Write the folded states back (a None state means the aggregate is gone or never existed)."""


def _key_arrays(keys: Sequence[AggregateKey]) -> tuple[list[str], list[str]]:
    return [org for org, _ in keys], [aggregate_id for _, aggregate_id in keys]


def _where_keys(table: str, columns: str) -> str:
    return f"SELECT {columns} FROM {table} WHERE (org_id, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"


class JsonStateTable(StateTable[S]):
    """States kept whole as msgspec JSON in a ``state`` column keyed by ``(org_id, id)``, so a fold
    resumes from exactly what the previous one computed."""

    table: str
    decoder: msgspec.json.Decoder[S]

    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, S]:
        rows = await conn.fetch(_where_keys(self.table, "org_id, id, state"), *_key_arrays(keys))
        return {(row["org_id"], row["id"]): self.decoder.decode(row["state"]) for row in rows}


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
    """A task row per task, and a row per approval of it (the approvals inbox)."""

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
        await _TASKS(conn, tasks)
        await _APPROVALS(conn, approvals)


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
                *_key_arrays(gone),
            )
        await _WORKERS(
            conn,
            [
                (org, w.id, w.queue, w.capabilities, w.status, w.last_heartbeat_at, to_json(w), item.seq)
                for (org, _), item in folded.items()
                if (w := item.state) is not None
            ],
        )


_ORGS = Upsert("orgs", key=("id",), columns=(("id", "text"), ("name", "text"), ("created_at", "timestamptz")))


class OrgTable(StateTable[Org | None]):
    decider = ORG

    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, Org | None]:
        rows = await conn.fetch(
            "SELECT id, name, created_at FROM orgs WHERE id = ANY($1::text[])", [org_id for _, org_id in keys]
        )
        found = {row["id"]: Org(id=row["id"], name=row["name"], created_at=row["created_at"]) for row in rows}
        return {key: found[key[1]] for key in keys if key[1] in found}

    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[Org | None]]) -> None:
        await _ORGS(conn, [(o.id, o.name, o.created_at) for item in folded.values() if (o := item.state) is not None])


_API_KEYS = Upsert(
    "api_keys",
    key=("id",),
    columns=(
        ("id", "text"),
        ("org_id", "text"),
        ("name", "text"),
        ("roles", "text[]"),
        ("secret_sha256", "text"),
        ("created_by", "text"),
        ("created_at", "timestamptz"),
        ("revoked_at", "timestamptz"),
    ),
)


class ApiKeyTable(StateTable[ApiKey | None]):
    """A row per API key; its org is the org of the key's subject."""

    decider = API_KEY

    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, ApiKey | None]:
        rows = await conn.fetch(
            _where_keys("api_keys", "org_id, id, name, roles, secret_sha256, created_by, created_at, revoked_at"),
            *_key_arrays(keys),
        )
        return {
            (row["org_id"], row["id"]): ApiKey(
                id=row["id"],
                name=row["name"],
                roles=tuple(row["roles"]),
                secret_sha256=row["secret_sha256"],
                created_by=row["created_by"],
                created_at=row["created_at"],
                revoked_at=row["revoked_at"],
            )
            for row in rows
        }

    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[ApiKey | None]]) -> None:
        await _API_KEYS(
            conn,
            [
                (k.id, org, k.name, k.roles, k.secret_sha256, k.created_by, k.created_at, k.revoked_at)
                for (org, _), item in folded.items()
                if (k := item.state) is not None
            ],
        )


_ENVIRONMENTS = Upsert(
    "environments",
    key=("org_id", "name"),
    columns=(
        ("org_id", "text"),
        ("name", "text"),
        ("queues", "text[]"),
        ("labels", "jsonb"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
        ("defined_by", "text"),
        ("seq", "bigint"),
    ),
)
_DELETE_OTHER_ENVIRONMENTS = """
DELETE FROM environments e WHERE e.org_id = ANY($1::text[]) AND NOT EXISTS (
    SELECT FROM unnest($2::text[], $3::text[]) AS kept(org_id, name) WHERE kept.org_id = e.org_id AND kept.name = e.name
)
"""


def environment_from_row(row: asyncpg.Record) -> Environment:
    return Environment(
        name=row["name"],
        queues=tuple(row["queues"]),
        labels=msgspec.json.decode(row["labels"], type=dict[str, str]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        defined_by=row["defined_by"],
    )


class EnvironmentTable(StateTable[Environments]):
    """A row per environment of each org (the org's one environments aggregate, spread over rows): a
    folded state replaces the org's rows, so a deleted environment's row goes."""

    decider = ENVIRONMENTS

    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, Environments]:
        rows = await conn.fetch(
            "SELECT org_id, name, queues, labels, created_at, updated_at, defined_by FROM environments"
            " WHERE org_id = ANY($1::text[])",
            [org for org, _ in keys],
        )
        by_org: dict[str, dict[str, Environment]] = defaultdict(dict)
        for row in rows:
            by_org[row["org_id"]][row["name"]] = environment_from_row(row)
        return {key: Environments(by_name=by_org[key[0]]) for key in keys if key[0] in by_org}

    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[Environments]]) -> None:
        kept = [(org, name) for (org, _), item in folded.items() for name in item.state.by_name]
        await conn.execute(
            _DELETE_OTHER_ENVIRONMENTS,
            [org for org, _ in folded],
            [org for org, _ in kept],
            [name for _, name in kept],
        )
        await _ENVIRONMENTS(
            conn,
            [
                (org, e.name, e.queues, to_json(e.labels), e.created_at, e.updated_at, e.defined_by, item.seq)
                for (org, _), item in folded.items()
                for e in item.state.listed()
            ],
        )


_SCHEDULES = Upsert(
    "schedules",
    key=("org_id", "id"),
    columns=(
        ("org_id", "text"),
        ("id", "text"),
        ("cron", "text"),
        ("timezone", "text"),
        ("overlap", "text"),
        ("paused", "boolean"),
        ("deleted", "boolean"),
        ("next_fire_at", "timestamptz"),
        ("last_task_id", "text"),
        ("created_at", "timestamptz"),
        ("state", "jsonb"),
        ("seq", "bigint"),
    ),
)


class ScheduleTable(JsonStateTable[ScheduleState]):
    """A row per schedule; a deleted one keeps its row (flagged), so one created again under its id
    folds on from it as the log does."""

    decider = SCHEDULE
    table = "schedules"
    decoder = msgspec.json.Decoder(ScheduleState)

    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[ScheduleState]]) -> None:
        await _SCHEDULES(
            conn,
            [
                (
                    org,
                    s.id,
                    s.cron,
                    s.timezone,
                    s.overlap,
                    s.paused,
                    s.deleted,
                    s.next_fire_at,
                    s.last_task_id,
                    s.created_at,
                    to_json(s),
                    item.seq,
                )
                for (org, _), item in folded.items()
                if (s := item.state) is not None
            ],
        )


def fold(
    decider: Decider[S], histories: dict[AggregateKey, list[RecordedEvent]], states: dict[AggregateKey, S]
) -> tuple[dict[AggregateKey, Folded[S]], int]:
    """Fold each aggregate's new events onto its stored state; returns the results and how many events
    could not be folded. ``evolve`` is pure and total for every event it knows, so a failure is a bug
    or a corrupt event: it is logged and skipped rather than wedging the projection forever."""
    folded: dict[AggregateKey, Folded[S]] = {}
    failures = 0
    for key, history in histories.items():
        state = states.get(key, decider.initial)
        for item in history:
            try:
                state = decider.evolve(state, item.event)
            except Exception:
                failures += 1
                kind = type(item.event).__name__
                log.exception("skipping %s at seq %d on %s: it cannot be folded", kind, item.seq, item.subject)
        folded[key] = Folded(state, history[-1].seq)
    return folded, failures


class Projection(ABC):
    """A named group of tables that one consumer and one checkpoint keep up to date."""

    name: str
    tables: tuple[str, ...]
    """Every table it owns, emptied by a rebuild."""

    @abstractmethod
    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> int:
        """Fold ``events`` (stream order, all newer than the checkpoint) inside the caller's
        transaction; returns how many were skipped because they could not be folded."""

    def reads(self, aggregate: str) -> bool:
        """Whether events of ``aggregate`` may change these tables (a batch of none of them is traced
        by no span; see ``projections.projector``)."""
        return True


class StateProjection(Projection):
    """Tables holding aggregate states, one :class:`StateTable` per aggregate type."""

    def __init__(self, name: str, tables: tuple[str, ...], states: dict[str, StateTable[Any]]) -> None:
        self.name = name
        self.tables = tables
        self._states = states

    def reads(self, aggregate: str) -> bool:
        return aggregate in self._states

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> int:
        histories: dict[str, dict[AggregateKey, list[RecordedEvent]]] = defaultdict(lambda: defaultdict(list))
        for item in events:
            org, aggregate, aggregate_id = address(item.subject)
            if aggregate in self._states:
                histories[aggregate][(org, aggregate_id)].append(item)
        failures = 0
        for aggregate, by_key in histories.items():
            table = self._states[aggregate]
            folded, failed = fold(table.decider, by_key, await table.load(conn, list(by_key)))
            await table.save(conn, folded)
            failures += failed
        return failures


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

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> int:
        failures = await super().apply(conn, events)
        completed = Counter(
            (address(item.subject)[0], item.event.worker_id) for item in events if isinstance(item.event, TaskCompleted)
        )
        if completed:
            orgs, workers = _key_arrays(list(completed))
            await conn.execute(_COUNT_COMPLETIONS, orgs, workers, list(completed.values()))
        return failures


class UsageDelta(msgspec.Struct, frozen=True):
    """What one event adds to an org's usage of a model on a day."""

    day: date
    model: str
    provider: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal

    def __add__(self, other: UsageDelta) -> UsageDelta:
        return msgspec.structs.replace(
            other,
            calls=self.calls + other.calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
        )


def usage_of(event: Event) -> UsageDelta | None:
    """The usage an LLM call recorded by a workflow reports. The log also holds operations a worker
    posted itself: one whose result is not an ``LlmCall`` adds nothing rather than stop the fold."""
    if not (isinstance(event, WorkflowOperationRecorded) and event.kind == "llm"):
        return None
    try:
        call = msgspec.convert(event.result, LlmCall)
    except msgspec.ValidationError:
        return None
    usage = call.usage or LlmUsage()
    return UsageDelta(
        day=event.at.date(),
        model=call.model,
        provider=call.provider or "unknown",
        calls=1,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_usd=Decimal(str(call.cost_usd or 0)),
    )


Route = tuple[str, str]
"""``(queue, workflow name)`` of a task, as its ``TaskSubmitted`` says; the workflow is ``""`` when
the task runs none."""
UNKNOWN_ROUTE: Route = ("", "")
"""The route of a task whose submission the fold never saw (refused by PostgreSQL and skipped): its
calls still count for the org, under no queue and no workflow."""


def route_of(event: TaskSubmitted) -> Route:
    return event.queue, "" if event.workflow is None else storable_text(event.workflow.name)


_USAGE = Upsert(
    "usage",
    key=("org_id", "day", "model", "queue", "workflow"),
    columns=(
        ("org_id", "text"),
        ("day", "date"),
        ("model", "text"),
        ("queue", "text"),
        ("workflow", "text"),
        ("provider", "text"),
        ("calls", "int"),
        ("prompt_tokens", "bigint"),
        ("completion_tokens", "bigint"),
        ("cost_usd", "numeric"),
    ),
    merge=tuple(
        (column, f"usage.{column} + excluded.{column}")
        for column in ("calls", "prompt_tokens", "completion_tokens", "cost_usd")
    ),
)
_USAGE_TASKS = Upsert(
    "usage_tasks",
    key=("org_id", "task_id"),
    columns=(("org_id", "text"), ("task_id", "text"), ("queue", "text"), ("workflow", "text")),
    only_if="false",  # a stored route is never replaced: a task's first submission decides, as in a rebuild
)


class UsageProjection(Projection):
    """Tokens, calls and cost per org, UTC day, model, queue and workflow, summed over the batch first
    (an upsert may touch a row once per statement).

    An LLM call is recorded on its task's subject and does not say the task's queue or workflow; the
    projection learns them from ``TaskSubmitted`` into ``usage_tasks``, a table of its own. Not the
    ``tasks`` table: another projection writes that one at its own pace (and a rebuild may refold one
    without the other), so this fold would not be exactly the log's. Events are taken in log order, so
    a call always finds the route of the submission before it, however the log is cut into batches."""

    name = "usage"
    tables = ("usage", "usage_tasks")

    def reads(self, aggregate: str) -> bool:
        return aggregate == "task"

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> int:
        relevant: list[tuple[AggregateKey, UsageDelta | Route]] = []
        for item in events:
            org, _, task_id = address(item.subject)
            if isinstance(item.event, TaskSubmitted):
                relevant.append(((org, task_id), route_of(item.event)))
            elif (delta := usage_of(item.event)) is not None:
                relevant.append(((org, task_id), delta))
        routes = await _stored_routes(conn, {key for key, fact in relevant if isinstance(fact, UsageDelta)})
        submitted: list[tuple[str, str, str, str]] = []
        totals: dict[tuple[str, date, str, str, str], UsageDelta] = {}
        for key, fact in relevant:
            if isinstance(fact, UsageDelta):
                row = (key[0], fact.day, fact.model, *routes.get(key, UNKNOWN_ROUTE))
                totals[row] = totals[row] + fact if row in totals else fact
            elif key not in routes:
                routes[key] = fact
                submitted.append((*key, *fact))
        await _USAGE_TASKS(conn, submitted)
        await _USAGE(
            conn,
            [
                (*row, d.provider, d.calls, d.prompt_tokens, d.completion_tokens, d.cost_usd)
                for row, d in totals.items()
            ],
        )
        return 0


async def _stored_routes(conn: asyncpg.Connection, keys: set[AggregateKey]) -> dict[AggregateKey, Route]:
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT org_id, task_id, queue, workflow FROM usage_tasks"
        " WHERE (org_id, task_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        *_key_arrays(list(keys)),
    )
    return {(row["org_id"], row["task_id"]): (row["queue"], row["workflow"]) for row in rows}


PROJECTIONS: dict[str, Projection] = {
    projection.name: projection
    for projection in (
        StateProjection("tasks", ("tasks", "approvals"), {"task": TaskTable()}),
        WorkersProjection(),
        StateProjection("access", ("orgs", "api_keys"), {"org": OrgTable(), "apikey": ApiKeyTable()}),
        UsageProjection(),
        StateProjection("environments", ("environments",), {ENVIRONMENTS_AGGREGATE: EnvironmentTable()}),
        StateProjection("schedules", ("schedules",), {SCHEDULE_AGGREGATE: ScheduleTable()}),
    )
}


def select(names: Sequence[str] | None) -> list[Projection]:
    """The projections called ``names`` (all when None), in a stable order."""
    if names is None:
        return list(PROJECTIONS.values())
    unknown = sorted(set(names) - PROJECTIONS.keys())
    if unknown:
        raise ValueError(f"unknown projection(s) {', '.join(unknown)}; known: {', '.join(PROJECTIONS)}")
    return [projection for name, projection in PROJECTIONS.items() if name in names]
