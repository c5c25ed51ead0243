"""The ``queues`` projection: each org's queue settings (one aggregate per org,
``cp.<org>.queues.all``), a row per queue that has settings of its own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from core.domain.queues import QUEUES, QUEUES_AGGREGATE, Queues, QueueSettings
from projections.folds.projection import StateProjection
from projections.folds.rows import Upsert
from projections.folds.tables import ORG_WIDE, OrgRowsTable


def queue_settings_from_row(row: asyncpg.Record) -> QueueSettings:
    return QueueSettings(
        queue=row["queue"],
        strategy=row["strategy"],
        breaker_failures=row["breaker_failures"],
        breaker_cooldown_seconds=row["breaker_cooldown_seconds"],
        configured=row["configured"],
        updated_at=row["updated_at"],
        configured_by=row["configured_by"],
    )


def _row(settings: QueueSettings) -> tuple[Any, ...]:
    return (
        settings.queue,
        settings.strategy,
        settings.breaker_failures,
        settings.breaker_cooldown_seconds,
        settings.configured,
        settings.updated_at,
        settings.configured_by,
    )


class QueueSettingsTable(OrgRowsTable[Queues]):
    """A row per queue with settings of its own (removing them deletes it), and the org's row
    (``queue`` empty, ``configured`` false): the defaults every other queue of the org has. The org's
    row is written whatever the state, so an org whose queues have all lost their settings still has a
    row carrying the seq of that last change, which a list of the configured queues answers with."""

    decider = QUEUES
    upsert = Upsert(
        "queue_settings",
        key=("org_id", "queue"),
        columns=(
            ("org_id", "text"),
            ("queue", "text"),
            ("strategy", "text"),
            ("breaker_failures", "int"),
            ("breaker_cooldown_seconds", "float8"),
            ("configured", "boolean"),
            ("updated_at", "timestamptz"),
            ("configured_by", "text"),
            ("seq", "bigint"),
        ),
    )

    def state_of(self, rows: Sequence[asyncpg.Record]) -> Queues:
        return Queues(by_name={row["queue"]: queue_settings_from_row(row) for row in rows if row["configured"]})

    def rows_of(self, state: Queues) -> Iterable[tuple[Any, ...]]:
        yield _row(QueueSettings(queue=ORG_WIDE))
        for settings in state.listed():
            yield _row(settings)


PROJECTION = StateProjection("queues", ("queue_settings",), {QUEUES_AGGREGATE: QueueSettingsTable()})
