"""How every read reaches PostgreSQL: org-scoped, read-only transactions.

Every org-scoped query is walled twice. It filters ``org_id`` explicitly, and it runs in a read-only
transaction as ``cp_reader`` (``set_config('role', …, true)`` is ``SET LOCAL ROLE``: superusers bypass
row-level security, the reader role does not) with ``cp.org`` set, so the tables' RLS policy hides
every other org's rows even from a query that forgot its filter. Where the role cannot be used (see
``projections.schema``) the explicit filter is the wall and a warning says so once. The few reads the
system makes across orgs say so (``Reads._across_orgs``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from projections.schema import READER_ROLE

log = logging.getLogger(__name__)


class Where:
    """``WHERE`` conditions with numbered parameters; ``{0}``, ``{1}`` … in a condition stand for its values."""

    def __init__(self) -> None:
        self.args: list[Any] = []
        self._conditions: list[str] = []

    @classmethod
    def matching(cls, org: str, **equal: Any) -> Where:
        """``org_id = org`` and ``column = value`` for every value that is not None."""
        where = cls()
        where.add("org_id = {0}", org)
        for column, value in equal.items():
            if value is not None:
                where.add(f"{column} = {{0}}", value)
        return where

    def add(self, condition: str, *values: Any) -> None:
        first = len(self.args) + 1
        self.args.extend(values)
        self._conditions.append(condition.format(*(f"${first + i}" for i in range(len(values)))))

    def __str__(self) -> str:
        return " AND ".join(self._conditions) or "true"


class Reads:
    """The base of the read model's query groups: the pool and the org scope they all read through."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._use_role: bool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool it reads from; a projector or rebuild in the same process may write through it
        (a running projector holds one of its connections per projection)."""
        return self._pool

    async def ping(self) -> None:
        """Raises unless PostgreSQL answers (for readiness checks)."""
        await self._pool.fetchval("SELECT 1")

    async def _fetch(self, org: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._scoped(org) as conn:
            return await conn.fetch(sql, *args)

    @asynccontextmanager
    async def _scoped(self, org: str) -> AsyncIterator[asyncpg.Connection]:
        """A read-only transaction that only sees ``org`` (as ``cp_reader`` where possible)."""
        scope = (
            f"SELECT set_config('role', '{READER_ROLE}', true), set_config('cp.org', $1, true)"
            if await self._reader_role()
            else "SELECT set_config('cp.org', $1, true)"
        )
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(scope, org)
            yield conn

    @asynccontextmanager
    async def _across_orgs(self, isolation: str | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A read-only transaction that sees every org: the system's own view, for the few reads that
        need it (the claim index's open tasks, the liveness timers' workers, the metrics' summary)."""
        async with self._pool.acquire() as conn, conn.transaction(isolation=isolation, readonly=True):
            await conn.execute("SET LOCAL cp.projector = 'on'")
            yield conn

    async def _reader_role(self) -> bool:
        if self._use_role is None:
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        await conn.execute(f"SET LOCAL ROLE {READER_ROLE}")
                    self._use_role = True
                except asyncpg.PostgresError as exc:
                    log.warning(
                        "cannot SET ROLE %s (%s): reads rely on their explicit org filters%s",
                        READER_ROLE,
                        exc,
                        ""
                        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                        else "; connected as a superuser, row-level security is bypassed",
                    )
                    self._use_role = False
        return self._use_role
