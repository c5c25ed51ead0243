"""Fixtures for integration tests: the shared nats-server's store, handler and a fresh org (from
tests/integration), a plain NATS connection in the account that holds the log, and a local webhook
receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from controlplane.embedded import EmbeddedNats
from tests.integration.conftest import handler, org, store
from tests.integrations.receiver import Receiver, serving_receiver

__all__ = ["handler", "nc", "org", "receiver", "store"]


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with serving_receiver() as running:
        yield running
