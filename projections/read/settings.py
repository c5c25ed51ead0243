"""Reads of what an org's admins set up: environments, schedules, queue settings, worker
configuration, and the names and versions of its secrets (never a value: the table holds none).

The gateway answers its lists from these, once the read model holds the caller's own writes
(``?min_seq=`` for anyone else's). Single objects, and every path that must act on the newest value
(a submit's environment, claims and attempt records, a task's read of a secret, the configuration a
registering worker gets), read the log instead."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import msgspec

from core.domain.environments import Environment
from core.domain.queues import QueueSettings
from core.domain.schedules import Schedule
from core.domain.secrets import SecretScope
from core.domain.worker_config import WorkerConfigs
from projections.folds.environments import environment_from_row
from projections.folds.queues import queue_settings_from_row
from projections.folds.secrets import secrets_from_rows
from projections.folds.worker_config import worker_configs_from_rows
from projections.read.scope import Reads

_SCHEDULE = msgspec.json.Decoder(Schedule)


def _seq(rows: Sequence[asyncpg.Record]) -> int:
    """The sequence of the last event folded into an org's one aggregate, which each of its rows
    carries (0: the org has none)."""
    return max((row["seq"] for row in rows), default=0)


class SettingsReads(Reads):
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

    async def list_schedules(self, org: str, *, limit: int = 1000) -> list[tuple[Schedule, int]]:
        """The org's live schedules, oldest first, each with the sequence of its last event folded."""
        rows = await self._fetch(
            org,
            "SELECT state, seq FROM schedules WHERE org_id = $1 AND NOT deleted ORDER BY created_at, id LIMIT $2",
            org,
            limit,
        )
        return [(_SCHEDULE.decode(row["state"]), row["seq"]) for row in rows]

    async def live_schedules(self) -> list[tuple[str, str]]:
        """``(org, schedule id)`` of every schedule not deleted, in every org: those whose fire timers
        matter."""
        async with self._across_orgs() as conn:
            rows = await conn.fetch("SELECT org_id, id FROM schedules WHERE NOT deleted")
        return [(row["org_id"], row["id"]) for row in rows]

    async def get_schedule(self, org: str, schedule_id: str) -> tuple[Schedule, int] | None:
        rows = await self._fetch(
            org, "SELECT state, seq FROM schedules WHERE org_id = $1 AND id = $2 AND NOT deleted", org, schedule_id
        )
        return (_SCHEDULE.decode(rows[0]["state"]), rows[0]["seq"]) if rows else None

    async def configured_queues(self, org: str) -> tuple[list[QueueSettings], int]:
        """The org's queues that have settings of their own, by name, and the sequence of the org's
        queue settings' last event folded (0: none ever set)."""
        rows = await self._fetch(org, "SELECT * FROM queue_settings WHERE org_id = $1 ORDER BY queue", org)
        return [queue_settings_from_row(row) for row in rows if row["configured"]], _seq(rows)

    async def worker_configs(self, org: str) -> tuple[WorkerConfigs, int]:
        """The org's worker configuration and each environment's, and the sequence of its last event
        folded (0: none ever set)."""
        rows = await self._fetch(org, "SELECT * FROM worker_config WHERE org_id = $1 ORDER BY environment", org)
        return worker_configs_from_rows(rows), _seq(rows)

    async def secret_scopes(self, org: str) -> tuple[list[SecretScope], int]:
        """Each of the org's secrets in each scope it was set in (by name, the org-wide scope first),
        and the sequence of the secrets' last event folded (0: none ever set)."""
        rows = await self._fetch(org, "SELECT * FROM secrets WHERE org_id = $1 ORDER BY name, version", org)
        return secrets_from_rows(rows).listed(), _seq(rows)
