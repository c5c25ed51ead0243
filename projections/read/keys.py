"""Reads of API keys, by key id: not org-scoped, since the org comes from the key itself."""

from __future__ import annotations

from datetime import datetime

import msgspec

from projections.read.scope import Reads


class ApiKeyRow(msgspec.Struct, frozen=True):
    id: str
    org_id: str
    name: str
    roles: tuple[str, ...]
    secret_sha256: str
    created_at: datetime
    revoked_at: datetime | None


class KeyReads(Reads):
    async def find_api_key(self, key_id: str) -> ApiKeyRow | None:
        row = await self._pool.fetchrow(
            "SELECT id, org_id, name, roles, secret_sha256, created_at, revoked_at FROM api_keys WHERE id = $1",
            key_id,
        )
        return None if row is None else msgspec.convert(dict(row), ApiKeyRow)
