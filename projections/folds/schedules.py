"""The ``schedules`` projection: a row per schedule (cron) of each org."""

from __future__ import annotations

import asyncpg
import msgspec

from core.domain.schedules import SCHEDULE, SCHEDULE_AGGREGATE, ScheduleState
from projections.folds.projection import StateProjection
from projections.folds.rows import Upsert, to_json
from projections.folds.tables import AggregateKey, Folded, JsonStateTable

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
    """A deleted schedule keeps its row (flagged), so one created again under its id folds on from it
    as the log does."""

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


PROJECTION = StateProjection("schedules", ("schedules",), {SCHEDULE_AGGREGATE: ScheduleTable()})
