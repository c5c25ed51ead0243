"""The ``access`` projection: orgs and their API keys (only a key's SHA-256, never the key)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from core.domain.access import API_KEY, ORG, ApiKey, Org
from projections.folds.projection import StateProjection
from projections.folds.rows import Upsert
from projections.folds.tables import AggregateKey, Folded, StateTable, key_arrays, where_keys

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
            where_keys("api_keys", "org_id, id, name, roles, secret_sha256, created_by, created_at, revoked_at"),
            *key_arrays(keys),
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


PROJECTION = StateProjection("access", ("orgs", "api_keys"), {"org": OrgTable(), "apikey": ApiKeyTable()})
