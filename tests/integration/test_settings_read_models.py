"""The read models of queue settings, worker configuration and secrets against a real nats-server and
PostgreSQL: their rows hold what the aggregates folded from the log hold (a secret's names, scopes and
versions, never its value), a rebuild equals the live fold, and on a database that existed before
them they fold the log from its start."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import asyncpg
import pytest
from nats.js.errors import NotFoundError

from core.domain.commands import ConfigureQueue, LlmConfig, RemoveQueueSettings, SetSecret, SetWorkerConfig
from core.domain.queues import QUEUES_AGGREGATE, QUEUES_ID
from core.domain.secrets import SECRETS_AGGREGATE, SECRETS_ID
from core.domain.worker_config import WORKER_CONFIG_AGGREGATE, WORKER_CONFIG_ID
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME, JetStreamEventStore
from core.secret_box import SecretBox, generate_key_text
from projections import schema
from projections.folds import PROJECTIONS
from projections.projector import Projector
from projections.read import ReadModel
from projections.rebuild import rebuild
from projections.schema import MIGRATIONS, ORG_SCOPED_TABLES
from tests.integration.test_projections import caught_up, fresh_database, handle, in_org, running

pytestmark = pytest.mark.integration

SETTINGS = {"queues": "queue_settings", "worker_config": "worker_config", "secrets": "secrets"}
"""These projections and their tables, made by migration 7."""


async def set_up(handler: CommandHandler, org: str, box: SecretBox) -> None:
    """Settings of every kind, a removal and a rotation among them."""
    await handle(handler, org, ConfigureQueue(queue="q1", strategy="round_robin", breaker_failures=5))
    await handle(handler, org, ConfigureQueue(queue="q2", strategy="least_loaded", breaker_cooldown_seconds=2.5))
    await handle(handler, org, RemoveQueueSettings(queue="q1"))
    await handle(handler, org, ConfigureQueue(queue="q3", strategy="random"))
    await handle(handler, org, SetWorkerConfig(lease_seconds=45, llm=LlmConfig(fallbacks=("m1", "m2"))))
    await handle(handler, org, SetWorkerConfig(environment="eu", heartbeat_interval_seconds=5))
    for version, environment in ((1, None), (2, "eu"), (3, None)):
        sealed = box.seal(org, "token", version, environment, f"value {version}")
        await handle(
            handler, org, SetSecret(name="token", environment=environment, version=version, **sealed._asdict())
        )


async def assert_rows_hold_the_log(handler: CommandHandler, org: str, reads: ReadModel) -> None:
    queues, queues_seq = await handler.load(org, QUEUES_AGGREGATE, QUEUES_ID)
    assert await reads.configured_queues(org) == (queues.listed(), queues_seq)
    configs, configs_seq = await handler.load(org, WORKER_CONFIG_AGGREGATE, WORKER_CONFIG_ID)
    assert await reads.worker_configs(org) == (configs, configs_seq)
    secrets, secrets_seq = await handler.load(org, SECRETS_AGGREGATE, SECRETS_ID)
    assert await reads.secret_scopes(org) == (secrets.listed(), secrets_seq)


async def settings_rows(pool: asyncpg.Pool, org: str) -> dict[str, list[dict[str, Any]]]:
    return {
        table: [
            dict(row)
            for row in await in_org(pool, org, f"SELECT * FROM {table} AS r WHERE org_id = $1 ORDER BY r", org)
        ]
        for table in SETTINGS.values()
    }


async def test_rows_hold_what_the_log_folds_to_and_a_rebuild_equals_the_live_fold(
    handler: CommandHandler,
    org: str,
    pool: asyncpg.Pool,
    projector: Projector,
    read_model: ReadModel,
    store: JetStreamEventStore,
) -> None:
    box = SecretBox.from_text(generate_key_text())
    async with running(projector):
        assert await read_model.configured_queues(org) == ([], 0)
        await set_up(handler, org, box)
        await caught_up(projector)
        await assert_rows_hold_the_log(handler, org, read_model)
        assert [settings.queue for settings in (await read_model.configured_queues(org))[0]] == ["q2", "q3"]

        await handle(handler, org, RemoveQueueSettings(queue="q2"))
        last = await handle(handler, org, RemoveQueueSettings(queue="q3"))
        await caught_up(projector)
        assert await read_model.configured_queues(org) == ([], last), "no queue left, and the list still has its seq"
    live = await settings_rows(pool, org)
    assert [(row["queue"], row["configured"], row["strategy"], row["seq"]) for row in live["queue_settings"]] == [
        ("", False, "fifo", last)
    ], "the org's row, with the defaults, stays when no queue has settings"
    assert [row["environment"] for row in live["worker_config"]] == ["", "eu"]
    assert [(row["name"], row["version"], row["environment"]) for row in live["secrets"]] == [
        ("token", 1, ""),
        ("token", 2, "eu"),
        ("token", 3, ""),
    ]

    report = await rebuild(pool, store.nc, list(SETTINGS), consumer_prefix=projector.consumer_prefix)
    assert set(report.projections) == set(SETTINGS)
    assert await settings_rows(pool, org) == live
    await assert_rows_hold_the_log(handler, org, read_model)


async def test_projections_added_to_an_existing_database_fold_the_log_from_its_start(
    database_url: str, handler: CommandHandler, org: str, store: JetStreamEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment from before migration 7 runs the projections it knew; the next release's projector
    migrates, finds no checkpoint for the new projections (so 0), and folds them from the log's first
    event up to the others before following the log with them."""
    await set_up(handler, org, SecretBox.from_text(generate_key_text()))
    prefix = f"proj-{org}-upgrade-"
    older = [name for name in PROJECTIONS if name not in SETTINGS]
    async with fresh_database(database_url) as existing:
        before = Projector(existing, store.nc, names=older, consumer_prefix=prefix, idle_wait=0.2)
        upgraded = Projector(existing, store.nc, consumer_prefix=prefix, idle_wait=0.2)
        try:
            monkeypatch.setattr(schema, "MIGRATIONS", tuple(m for m in MIGRATIONS if m.version < 7))
            monkeypatch.setattr(
                schema, "ORG_SCOPED_TABLES", tuple(t for t in ORG_SCOPED_TABLES if t not in SETTINGS.values())
            )
            async with running(before):
                await caught_up(before)
            monkeypatch.undo()
            assert not set(SETTINGS) & set(await before.checkpoints())

            async with running(upgraded):  # its start applies migration 7
                await caught_up(upgraded)
                checkpoints = await upgraded.checkpoints()
            assert set(checkpoints) == set(PROJECTIONS)
            assert {checkpoints[name] for name in SETTINGS} == {checkpoints["tasks"]}, "caught up with the others"
            reads = ReadModel(existing)
            try:
                await assert_rows_hold_the_log(handler, org, reads)
            finally:
                await reads.close()
        finally:
            for projector in (before, upgraded):
                with suppress(NotFoundError):
                    await store.nc.jetstream().delete_consumer(STREAM_NAME, projector.consumer_name)
