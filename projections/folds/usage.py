"""The ``usage`` projection: tokens, calls and cost of the LLM calls workflows recorded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from decimal import Decimal

import asyncpg
import msgspec

from core.domain.events import Event, LlmCall, LlmUsage, TaskSubmitted, WorkflowOperationRecorded
from core.domain.records import RecordedEvent
from projections.folds.cache import BatchStates
from projections.folds.projection import Projection, address_of
from projections.folds.rows import Upsert, storable_text, upsert_together
from projections.folds.tables import AggregateKey, key_arrays


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

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], states: BatchStates | None = None
    ) -> int:
        relevant: list[tuple[AggregateKey, UsageDelta | Route]] = []
        for item in events:
            fact: UsageDelta | Route | None = (
                route_of(item.event) if isinstance(item.event, TaskSubmitted) else usage_of(item.event)
            )
            if fact is not None:
                address = address_of(item.subject)
                relevant.append(((address.org, address.id), fact))
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
        usage = [
            (*row, d.provider, d.calls, d.prompt_tokens, d.completion_tokens, d.cost_usd) for row, d in totals.items()
        ]
        await upsert_together(conn, [(_USAGE_TASKS, submitted), (_USAGE, usage)])
        return 0


async def _stored_routes(conn: asyncpg.Connection, keys: set[AggregateKey]) -> dict[AggregateKey, Route]:
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT org_id, task_id, queue, workflow FROM usage_tasks"
        " WHERE (org_id, task_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        *key_arrays(list(keys)),
    )
    return {(row["org_id"], row["task_id"]): (row["queue"], row["workflow"]) for row in rows}


PROJECTION = UsageProjection()
