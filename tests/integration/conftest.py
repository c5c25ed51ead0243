"""Fixtures for tests that talk to the real nats-server started in tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.embedded import EmbeddedNats
from core.handler import CommandHandler
from core.ids import new_id
from core.store import JetStreamEventStore


@pytest.fixture
async def store(nats_server: EmbeddedNats) -> AsyncIterator[JetStreamEventStore]:
    opened = await JetStreamEventStore.connect(nats_server.url)
    yield opened
    await opened.close()


@pytest.fixture
async def handler(store: JetStreamEventStore) -> AsyncIterator[CommandHandler]:
    opened = CommandHandler(store)
    yield opened
    await opened.close()


@pytest.fixture
def org() -> str:
    """A fresh org per test keeps tests apart on one shared stream."""
    return f"org-{new_id()[-10:]}"
