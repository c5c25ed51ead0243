"""The chaos tests' servers: a NATS and a PostgreSQL of each test's own, so stopping or killing them,
or what runs on them, harms no other test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from controlplane.embedded import EmbeddedNats
from controlplane.embedded_postgres import EmbeddedPostgres
from core.log.store import JetStreamEventStore
from projections.schema import migrate


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, EmbeddedPostgres]]:
    with EmbeddedNats(tmp_path / "nats") as nats_server, EmbeddedPostgres(tmp_path / "postgres") as postgres:
        yield nats_server, postgres


@pytest.fixture
async def log_and_database(
    servers: tuple[EmbeddedNats, EmbeddedPostgres],
) -> AsyncIterator[tuple[JetStreamEventStore, asyncpg.Pool]]:
    """The log, provisioned, and a pool on the database with the read model's schema migrated."""
    nats_server, postgres = servers
    store = await JetStreamEventStore.connect(nats_server.url)
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=4)
    try:
        await migrate(pool)
        yield store, pool
    finally:
        await pool.close()
        await store.close()
