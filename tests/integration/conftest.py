"""Fixtures for tests that talk to the real nats-server started in tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import suppress

import asyncpg
import pytest
from nats.js.errors import NotFoundError

from controlplane.embedded import EmbeddedNats
from core.domain.ids import new_id
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME, JetStreamEventStore
from projections.projector import Projector
from projections.read import ReadModel
from projections.schema import migrate
from tests.integration.test_projections import fresh_database


@pytest.fixture
async def store(nats_server: EmbeddedNats) -> AsyncIterator[JetStreamEventStore]:
    opened = await JetStreamEventStore.connect(nats_server.url)
    yield opened
    await opened.close()


@pytest.fixture
def handler(store: JetStreamEventStore) -> CommandHandler:
    return CommandHandler(store)


@pytest.fixture
def org() -> str:
    """A fresh org per test keeps tests apart on one shared stream."""
    return f"org-{new_id()[-10:]}"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A fresh, migrated database on the session's PostgreSQL."""
    async with fresh_database(database_url) as opened:
        await migrate(opened)
        yield opened


@pytest.fixture
async def projector(pool: asyncpg.Pool, store: JetStreamEventStore, org: str) -> AsyncIterator[Projector]:
    """Not started; its durable consumer is removed at the end."""
    made = Projector(pool, store.nc, consumer_prefix=f"proj-{org}-", idle_wait=0.2)
    yield made
    await made.stop()
    with suppress(NotFoundError):
        await store.nc.jetstream().delete_consumer(STREAM_NAME, made.consumer_name)


@pytest.fixture
async def read_model(pool: asyncpg.Pool) -> AsyncIterator[ReadModel]:
    model = ReadModel(pool, poll_interval=0.2)
    yield model
    await model.close()
