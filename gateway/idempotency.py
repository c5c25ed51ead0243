"""Idempotency for requests that do not name their aggregate up front (a claim picks a task): the
outcome's aggregate id is kept in a JetStream key-value bucket for a day, keyed by the derived id."""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from core.log.store import JetStreamEventStore

BUCKET = "CP_IDEMPOTENCY"
TTL_SECONDS = 24 * 3600


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
