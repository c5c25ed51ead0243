"""Where aggregate states live in the read model: a :class:`StateTable` per aggregate type loads the
stored states a batch touches and saves them back once folded.

Three shapes: a table of its own per aggregate type (orgs, API keys); a row per aggregate with its
whole state as JSON (:class:`JsonStateTable`: tasks, workers, schedules); and one aggregate per org
spread over rows, one per item it holds (:class:`OrgRowsTable`: environments, queue settings, worker
configuration, secrets)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, TypeVar

import asyncpg
import msgspec

from core.domain.decider import Decider
from projections.folds.rows import Upsert, array_type, storable_column

S = TypeVar("S")
AggregateKey = tuple[str, str]
"""``(org, aggregate id)`` as in the subject ``cp.<org>.<aggregate>.<id>``."""
ORG_WIDE = ""
"""The key of a row that stands for the whole org rather than one environment (``worker_config``,
``secrets``) or one queue (``queue_settings``: the defaults): not NULL, because such columns are part
of a primary key, and the same in every table. Environment and queue names are never empty."""


@dataclass(slots=True)
class Folded(Generic[S]):
    state: S
    seq: int
    """Stream sequence of the last event folded into ``state``."""


class StateTable(ABC, Generic[S]):
    """Where one aggregate type's state lives in the read model."""

    decider: Decider[S]
    stored_whole = False
    """Whether a row holds its aggregate's state whole, so that :meth:`load` returns the state a fold
    saved (``projections.folds.cache``)."""

    @abstractmethod
    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, S]:
        """The stored state of those of ``keys`` that have a row."""

    @abstractmethod
    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[S]]) -> None:
        """Write the folded states back (a None state means the aggregate is gone or never existed)."""


def key_arrays(keys: Sequence[AggregateKey]) -> tuple[list[str], list[str]]:
    """``keys`` as the two ``text[]`` parameters ``(org_id, id) IN (SELECT * FROM unnest($1, $2))`` takes."""
    return [org for org, _ in keys], [aggregate_id for _, aggregate_id in keys]


def where_keys(table: str, columns: str) -> str:
    return f"SELECT {columns} FROM {table} WHERE (org_id, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"


class JsonStateTable(StateTable[S]):
    """States kept whole as msgspec JSON in a ``state`` column keyed by ``(org_id, id)``, so a fold
    resumes from exactly what the previous one computed."""

    table: str
    decoder: msgspec.json.Decoder[S]
    stored_whole = True

    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, S]:
        rows = await conn.fetch(where_keys(self.table, "org_id, id, state"), *key_arrays(keys))
        return {(row["org_id"], row["id"]): self.decoder.decode(row["state"]) for row in rows}


class OrgRowsTable(StateTable[S]):
    """One aggregate per org (its id is fixed) spread over a table's rows, one per item the state
    holds, keyed by ``org_id`` and the item's own key. Every row of an org carries the sequence of the
    aggregate's last event folded, so each says how fresh the whole is. A folded state replaces the
    org's rows whole: its items are upserted, the rows of items it no longer holds deleted."""

    upsert: Upsert
    """Writes the rows: ``org_id`` first, ``seq`` last; its key is ``org_id`` and the item's key."""

    @abstractmethod
    def state_of(self, rows: Sequence[asyncpg.Record]) -> S:
        """The state an org's stored rows (all of them, in key order) hold."""

    @abstractmethod
    def rows_of(self, state: S) -> Iterable[tuple[Any, ...]]:
        """A state's rows in the upsert's column order, without ``org_id`` and ``seq``."""

    async def load(self, conn: asyncpg.Connection, keys: Sequence[AggregateKey]) -> dict[AggregateKey, S]:
        rows = await conn.fetch(
            f"SELECT * FROM {self.upsert.table} WHERE org_id = ANY($1::text[]) ORDER BY {', '.join(self.upsert.key)}",
            [org for org, _ in keys],
        )
        by_org: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_org[row["org_id"]].append(row)
        return {key: self.state_of(by_org[key[0]]) for key in keys if key[0] in by_org}

    async def save(self, conn: asyncpg.Connection, folded: dict[AggregateKey, Folded[S]]) -> None:
        rows = [(org, *row, item.seq) for (org, _), item in folded.items() for row in self.rows_of(item.state)]
        columns = [name for name, _ in self.upsert.columns]
        types = dict(self.upsert.columns)
        kept = [storable_column(types[name], [row[columns.index(name)] for row in rows]) for name in self.upsert.key]
        await conn.execute(self._delete_others, [org for org, _ in folded], *kept)
        await self.upsert(conn, rows)

    @cached_property
    def _delete_others(self) -> str:
        """Deletes the rows of the orgs ``$1`` whose keys the kept rows (``$2``… one array per key
        column) do not hold."""
        types = dict(self.upsert.columns)
        key = self.upsert.key
        params = ", ".join(f"${2 + index}::{array_type(types[name])}" for index, name in enumerate(key))
        matches = " AND ".join(f"kept.{name} = t.{name}" for name in key)
        return (
            f"DELETE FROM {self.upsert.table} t WHERE t.org_id = ANY($1::text[])"
            f" AND NOT EXISTS (SELECT FROM unnest({params}) AS kept({', '.join(key)}) WHERE {matches})"
        )
