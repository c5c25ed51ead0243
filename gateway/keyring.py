"""Where an API key is checked. The log holds the truth about a key (roles, secret hash, revocation)
and answers while PostgreSQL is down; the read model is needed only to learn which org a key id
belongs to, once (a key never changes org), and stands in for the log while NATS is down. The key ids
whose org it remembers are bounded: a forgotten one is read again when next used."""

from __future__ import annotations

from typing import Any

import nats.errors

from core.domain.access import ApiKey
from core.domain.subjects import parse_aggregate_subject
from core.log.event_store import StoreError
from core.log.handler import CommandHandler
from core.lru import Lru
from gateway.auth import KeyRecord
from projections.read import ReadModel

ORGS_REMEMBERED = 16_384


class KeyRing:
    def __init__(self, handler: CommandHandler, read_model: ReadModel, size: int = ORGS_REMEMBERED) -> None:
        self._handler, self._read_model = handler, read_model
        self._org_of: Lru[str, str] = Lru(size)

    async def lookup(self, key_id: str) -> KeyRecord | None:
        org = self._org_of.get(key_id)
        if org is None:
            row = await self._read_model.find_api_key(key_id)
            if row is None:
                return None
            org = row.org_id
            self._org_of.put(key_id, org)
        try:
            key, _ = await self._handler.load(org, "apikey", key_id)
        except (StoreError, nats.errors.Error):
            row = await self._read_model.find_api_key(key_id)
            if row is None:
                return None
            return KeyRecord(org, row.roles, row.secret_sha256, revoked=row.revoked_at is not None)
        if not isinstance(key, ApiKey):
            return None
        return KeyRecord(org, key.roles, key.secret_sha256, revoked=key.revoked_at is not None)

    def observe(self, subject: str, state: Any, seq: int) -> None:
        """A key created through this gateway is usable here before the read model has it."""
        if isinstance(state, ApiKey):
            self._org_of.put(state.id, parse_aggregate_subject(subject).org)
