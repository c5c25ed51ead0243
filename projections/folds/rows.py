"""How folded rows reach PostgreSQL: batched upserts, and the values text and jsonb columns cannot hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

import asyncpg
import msgspec

_encode = msgspec.json.Encoder().encode

NUL = "\x00"
NUL_STAND_IN = "\u2400"
"""PostgreSQL text and jsonb cannot hold U+0000, which commands accept inside strings; the read model
shows it as ␀ (U+2400), the same way in every fold, rather than refusing the event."""
NUL_ESCAPE = "\\u0000"
"""How JSON spells a NUL inside a string."""


def to_json(value: Any) -> str:
    """asyncpg passes ``jsonb`` parameters as text."""
    return _encode(value).decode()


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(NUL, NUL_STAND_IN)
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value


def storable_text(value: Any) -> Any:
    return value.replace(NUL, NUL_STAND_IN) if isinstance(value, str) and NUL in value else value


def storable_json(text: str) -> str:
    """JSON text jsonb accepts. The substring check is a cheap filter (it also matches an escaped
    backslash followed by ``u0000``); the rare hit re-encodes exactly."""
    return to_json(_without_nul(msgspec.json.decode(text))) if NUL_ESCAPE in text else text


def array_type(sql_type: str) -> str:
    """The type of the array parameter that carries a column's values (see :func:`storable_column`)."""
    return f"{'jsonb' if sql_type == 'text[]' else sql_type}[]"


def storable_column(sql_type: str, values: Sequence[Any]) -> list[Any]:
    """One column's values as its array parameter takes them: a ``text[]`` value as JSON (``unnest``
    flattens arrays of arrays), ``jsonb`` and ``text`` without NUL."""
    if sql_type == "text[]":
        return [storable_json(to_json(value)) for value in values]
    if sql_type == "jsonb":
        return [storable_json(value) for value in values]
    if sql_type == "text":
        return [storable_text(value) for value in values]
    return list(values)


@dataclass(frozen=True)
class Upsert:
    """``INSERT … SELECT … FROM unnest(<one array per column>) ON CONFLICT DO UPDATE``: a whole batch
    of rows in one statement and one round trip. Rows are tuples in ``columns`` order; a ``text[]``
    column takes a Python sequence per row, a ``jsonb`` one JSON text."""

    table: str
    key: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]
    on_insert: tuple[tuple[str, str], ...] = ()
    """``(column, SQL expression over the row r)`` set by an insert and left alone by an update."""
    merge: tuple[tuple[str, str], ...] = ()
    """``(column, SQL expression)`` replacing ``excluded.<column>`` in the update."""
    only_if: str | None = None
    """Condition under which a conflicting row is updated."""

    @cached_property
    def sql(self) -> str:
        return self.statement(1)

    def statement(self, first: int) -> str:
        """The upsert with its column arrays as the parameters ``$first``, ``$first + 1``, …"""
        names = [name for name, _ in self.columns]
        params = ", ".join(
            f"${number}::{array_type(sql_type)}" for number, (_, sql_type) in enumerate(self.columns, start=first)
        )
        values = [
            f"ARRAY(SELECT jsonb_array_elements_text(r.{name}))" if sql_type == "text[]" else f"r.{name}"
            for name, sql_type in self.columns
        ]
        targets = names + [name for name, _ in self.on_insert]
        merged = dict(self.merge)
        updates = ", ".join(
            f"{name} = {merged.get(name, f'excluded.{name}')}" for name in names if name not in self.key
        )
        return (
            f"INSERT INTO {self.table} ({', '.join(targets)}) "
            f"SELECT {', '.join(values + [expression for _, expression in self.on_insert])} "
            f"FROM unnest({params}) AS r({', '.join(names)}) "
            f"ON CONFLICT ({', '.join(self.key)}) DO UPDATE SET {updates}"
            + (f" WHERE {self.only_if}" if self.only_if else "")
        )

    def arrays(self, rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
        """The statement's parameters for ``rows``: one array per column."""
        columns = zip(*rows, strict=True)
        return [storable_column(sql_type, values) for (_, sql_type), values in zip(self.columns, columns, strict=True)]

    async def __call__(self, conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        if rows:
            await conn.execute(self.sql, *self.arrays(rows))


async def upsert_together(conn: asyncpg.Connection, writes: Sequence[tuple[Upsert, Sequence[tuple[Any, ...]]]]) -> None:
    """Several upserts in one statement (all but the last as ``WITH`` queries): one round trip, not one
    each. Only for upserts into distinct tables that none of the others reads (``on_insert``,
    ``only_if``): the parts of one statement see the same snapshot, not each other's rows."""
    given = [(upsert, rows) for upsert, rows in writes if rows]
    if len(given) == 1:
        await given[0][0](conn, given[0][1])
    elif given:
        arrays = [array for upsert, rows in given for array in upsert.arrays(rows)]
        await conn.execute(_together(tuple(upsert for upsert, _ in given)), *arrays)


@cache
def _together(upserts: tuple[Upsert, ...]) -> str:
    parts: list[str] = []
    first = 1
    for upsert in upserts:
        parts.append(upsert.statement(first))
        first += len(upsert.columns)
    *withs, last = parts
    return f"WITH {', '.join(f'w{index} AS ({part})' for index, part in enumerate(withs))} {last}"
