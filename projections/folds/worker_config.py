"""The ``worker_config`` projection: each org's worker configuration (one aggregate per org,
``cp.<org>.workerconfig.all``), a row for the org's own and one per environment that set its own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import msgspec

from core.domain.worker_config import UNSET, WORKER_CONFIG, WORKER_CONFIG_AGGREGATE, WorkerConfig, WorkerConfigs
from projections.folds.projection import StateProjection
from projections.folds.rows import Upsert, to_json
from projections.folds.tables import ORG_WIDE, OrgRowsTable

_settings = msgspec.json.Decoder(WorkerConfig)


def worker_configs_from_rows(rows: Sequence[asyncpg.Record]) -> WorkerConfigs:
    """An org's configurations from its rows (none: nothing set)."""
    by_scope = {row["environment"]: _settings.decode(row["settings"]) for row in rows}
    return WorkerConfigs(org=by_scope.pop(ORG_WIDE, UNSET), by_environment=by_scope)


class WorkerConfigTable(OrgRowsTable[WorkerConfigs]):
    """The org's own row is written whatever was set (all null when only environments set theirs), so
    an org with any configuration has a row carrying the seq of its last change."""

    decider = WORKER_CONFIG
    upsert = Upsert(
        "worker_config",
        key=("org_id", "environment"),
        columns=(("org_id", "text"), ("environment", "text"), ("settings", "jsonb"), ("seq", "bigint")),
    )

    def state_of(self, rows: Sequence[asyncpg.Record]) -> WorkerConfigs:
        return worker_configs_from_rows(rows)

    def rows_of(self, state: WorkerConfigs) -> Iterable[tuple[Any, ...]]:
        yield ORG_WIDE, to_json(state.org)
        for environment in sorted(state.by_environment):
            yield environment, to_json(state.by_environment[environment])


PROJECTION = StateProjection("worker_config", ("worker_config",), {WORKER_CONFIG_AGGREGATE: WorkerConfigTable()})
