"""A whole stack of this package's own (nats-server, a fresh database, projector, gateway): its tests
call the application layer's operations directly on the gateway's parts, and the HTTP API beside them
to compare."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.gateway.conftest import Stack, own_stack


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    async with own_stack(tmp_path_factory.mktemp("application-nats"), database_url) as served:
        yield served
