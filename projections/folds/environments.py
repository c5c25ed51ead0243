"""The ``environments`` projection: a row per environment of each org (the org's one environments
aggregate, spread over rows), with the queues it holds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import msgspec

from core.domain.environments import ENVIRONMENTS, ENVIRONMENTS_AGGREGATE, Environment, Environments
from projections.folds.projection import StateProjection
from projections.folds.rows import Upsert, to_json
from projections.folds.tables import OrgRowsTable


def environment_from_row(row: asyncpg.Record) -> Environment:
    return Environment(
        name=row["name"],
        queues=tuple(row["queues"]),
        labels=msgspec.json.decode(row["labels"], type=dict[str, str]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        defined_by=row["defined_by"],
    )


class EnvironmentTable(OrgRowsTable[Environments]):
    """A deleted environment's row goes."""

    decider = ENVIRONMENTS
    upsert = Upsert(
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

    def state_of(self, rows: Sequence[asyncpg.Record]) -> Environments:
        return Environments(by_name={row["name"]: environment_from_row(row) for row in rows})

    def rows_of(self, state: Environments) -> Iterable[tuple[Any, ...]]:
        return ((e.name, e.queues, to_json(e.labels), e.created_at, e.updated_at, e.defined_by) for e in state.listed())


PROJECTION = StateProjection("environments", ("environments",), {ENVIRONMENTS_AGGREGATE: EnvironmentTable()})
