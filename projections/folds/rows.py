"""How folded rows reach PostgreSQL: batched upserts, and the values text and jsonb columns cannot hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import asyncpg
import msgspec

_encode = msgspec.json.Encoder().encode

NUL = "\x00"
NUL_STAND_IN = "\u2400"
"""PostgreSQL text and jsonb cannot hold U+0000, which commands accept inside strings; the read model
shows it as ␀ (U+2400), the same way in every fold, rather than refusing the event."""


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
    return to_json(_without_nul(msgspec.json.decode(text))) if "\\u0000" in text else text


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
        names = [name for name, _ in self.columns]
        params = ", ".join(
            f"${number}::{array_type(sql_type)}" for number, (_, sql_type) in enumerate(self.columns, start=1)
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

    async def __call__(self, conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        columns = zip(*rows, strict=True)
        arrays = [
            storable_column(sql_type, values) for (_, sql_type), values in zip(self.columns, columns, strict=True)
        ]
        await conn.execute(self.sql, *arrays)
