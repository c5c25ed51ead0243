"""Idempotency beyond the command handler's: ids derived from a caller's idempotency key, and the
records of requests that do not name their aggregate up front (a claim picks a task), whose outcome's
aggregate id is kept in a JetStream key-value bucket for a day, keyed by the derived id."""

from __future__ import annotations

import hashlib

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from core.log.store import JetStreamEventStore

BUCKET = "CP_IDEMPOTENCY"
TTL_SECONDS = 24 * 3600


def derived_id(*parts: str) -> str:
    """A stable token from the parts (org, credential, key, ...), so a retried request maps to the same
    command and aggregate ids and returns the original outcome."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


class IdempotencyRecords:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, store: JetStreamEventStore) -> IdempotencyRecords:
        return cls(await store.key_value(BUCKET, ttl_seconds=TTL_SECONDS))

    async def recall(self, derived_id: str) -> str | None:
        try:
            entry = await self._kv.get(derived_id)
        except KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def remember(self, derived_id: str, aggregate_id: str) -> None:
        await self._kv.put(derived_id, aggregate_id.encode())
