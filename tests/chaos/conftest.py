"""The chaos tests' servers: a NATS and a PostgreSQL of each test's own, so stopping or killing them,
or what runs on them, harms no other test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.embedded import EmbeddedNats
from controlplane.embedded_postgres import EmbeddedPostgres


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, EmbeddedPostgres]]:
    with EmbeddedNats(tmp_path / "nats") as nats_server, EmbeddedPostgres(tmp_path / "postgres") as postgres:
        yield nats_server, postgres
