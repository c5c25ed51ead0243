"""Projections sharded by org against a real nats-server and PostgreSQL: n shards together write what
one projector writes, each shard only its own orgs, readers wait for the slowest shard, one shard
layout per database, and a rebuild resets the shards.

Two databases per test: the sharded one under test and a reference folded by one unsharded
projector. The stream is shared by the whole session, so both fold every event of it; comparisons
are per org."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path

import asyncpg
import pytest
from nats.js.errors import NotFoundError

from controlplane.devstack import with_database
from controlplane.embedded import EmbeddedNats
from core.domain.commands import RegisterWorker
from core.domain.ids import new_id
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME, JetStreamEventStore
from projections.folds import PROJECTIONS
from projections.leadership import ProjectionBusy, ShardLayoutConflict
from projections.projector import Projector
from projections.read import ReadModel
from projections.rebuild import last_event_seq, rebuild
from projections.schema import migrate
from projections.shards import Shard, effective_checkpoints, fetch_checkpoints, parse_shard
from tests.integration.test_projections import (
    ORG_TABLES,
    caught_up,
    fresh_database,
    handle,
    in_org,
    play_random_history,
    running,
    snapshot,
    submit,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
CONTROLPLANE = str(Path(sys.executable).parent / "controlplane")


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The database the shards write, with a pool large enough for three shard projectors at once
    (each holds a connection per projection)."""
    async with fresh_database(database_url) as small:
        await migrate(small)
        name = await small.fetchval("SELECT current_database()")
        large = await asyncpg.create_pool(database_url, database=name, min_size=1, max_size=24)
        try:
            yield large
        finally:
            await large.close()


@pytest.fixture
async def prefix(store: JetStreamEventStore) -> AsyncIterator[str]:
    """The test's consumer prefix; every consumer named with it is removed at the end."""
    made = f"proj-{new_id()[-10:]}-"
    yield made
    js = store.nc.jetstream()
    for info in await js.consumers_info(STREAM_NAME):
        if info.name.startswith(made):
            with suppress(NotFoundError):
                await js.delete_consumer(STREAM_NAME, info.name)


@pytest.fixture
async def reference(database_url: str, store: JetStreamEventStore, prefix: str) -> AsyncIterator[asyncpg.Pool]:
    """A second database, kept up to date by one unsharded projector for the whole test."""
    async with (
        fresh_database(database_url) as opened,
        running(Projector(opened, store.nc, consumer_prefix=f"{prefix}ref-", idle_wait=0.2)),
    ):
        yield opened


@pytest.fixture
async def read_model(pool: asyncpg.Pool) -> AsyncIterator[ReadModel]:
    model = ReadModel(pool, poll_interval=0.2)
    yield model
    await model.close()


def orgs_covering(*counts: int, each: int = 1) -> list[str]:
    """Fresh orgs such that, for each shard count, every shard of that count owns at least ``each``."""
    orgs: list[str] = []
    while any(sum(shard.owns(org) for org in orgs) < each for count in counts for shard in Shard(1, count).siblings()):
        orgs.append(f"org-{new_id()[-10:]}")
    return orgs


def shards(pool: asyncpg.Pool, store: JetStreamEventStore, prefix: str, count: int) -> list[Projector]:
    return [
        Projector(pool, store.nc, shard=shard, consumer_prefix=prefix, idle_wait=0.2)
        for shard in Shard(1, count).siblings()
    ]


async def run_all(stack: AsyncExitStack, projectors: Sequence[Projector]) -> None:
    for projector in projectors:
        await stack.enter_async_context(running(projector))


async def play(handler: CommandHandler, orgs: Sequence[str], seed: int, steps: int) -> None:
    """A random history per org, the orgs' commands interleaved on the log."""
    await asyncio.gather(*(play_random_history(handler, org, seed + i, steps) for i, org in enumerate(orgs)))


async def own_checkpoint_reaches(pool: asyncpg.Pool, key: str, seq: int) -> None:
    """Until the checkpoint row ``key`` (one shard's, not the projection's) is at ``seq`` or later."""
    async with asyncio.timeout(20):
        while (await fetch_checkpoints(pool)).get(key, 0) < seq:
            await asyncio.sleep(0.05)


async def notified_checkpoint_reaches(read_model: ReadModel, projection: str, seq: int) -> None:
    """Until the checkpoint ``read_model`` keeps from notifications (it re-reads the table only when it
    knows no row of the projection) is at ``seq`` or later."""
    async with asyncio.timeout(10):
        while await read_model.checkpoint(projection) < seq:
            await asyncio.sleep(0.05)


async def rows_of(pool: asyncpg.Pool, org: str) -> dict[str, int]:
    """How many rows ``org`` has in each projection table."""
    return {
        table: (await in_org(pool, org, f"SELECT count(*) AS n FROM {table} WHERE {column} = $1", org))[0]["n"]
        for table, column in ORG_TABLES.items()
    }


async def assert_equal_to_reference(
    store: JetStreamEventStore, pool: asyncpg.Pool, reference: asyncpg.Pool, orgs: Sequence[str]
) -> None:
    """Once both databases have folded the whole log, every org's rows are the same in both."""
    for database in (pool, reference):
        await caught_up(Projector(database, store.nc))
    for org in orgs:
        tables = await snapshot(pool, org)
        assert tables == await snapshot(reference, org), org
        assert tables["tasks"], org  # the comparison compared something


# --- n shards equal one ---------------------------------------------------------------------------


async def test_two_shards_together_write_what_one_projector_writes(
    handler: CommandHandler, store: JetStreamEventStore, pool: asyncpg.Pool, reference: asyncpg.Pool, prefix: str
) -> None:
    orgs = orgs_covering(2, each=2)
    async with AsyncExitStack() as stack:
        await run_all(stack, shards(pool, store, prefix, 2))
        await play(handler, orgs, seed=11, steps=120)  # live: many small batches while commands come in
        await assert_equal_to_reference(store, pool, reference, orgs)
    rows = await fetch_checkpoints(pool)
    assert {key for key in rows if key.startswith("tasks")} == {"tasks@1/2", "tasks@2/2"}


async def test_a_shard_writes_only_its_own_orgs_and_readers_wait_for_every_shard(
    handler: CommandHandler, store: JetStreamEventStore, pool: asyncpg.Pool, prefix: str, read_model: ReadModel
) -> None:
    orgs = orgs_covering(2)
    first_org, second_org = (next(org for org in orgs if shard.owns(org)) for shard in Shard(1, 2).siblings())
    for org in (first_org, second_org):
        await handle(handler, org, RegisterWorker(worker_id="w1"))
        seq = await submit(handler, org, "t1")
    first, second = shards(pool, store, prefix, 2)

    async with running(first):
        await own_checkpoint_reaches(pool, "tasks@1/2", seq)
        waiting = asyncio.create_task(read_model.wait_for("tasks", seq, timeout=20))
        assert (await rows_of(pool, first_org))["tasks"] == 1
        assert set((await rows_of(pool, second_org)).values()) == {0}  # not one row of the other shard's org
        assert await read_model.checkpoint("tasks") < seq  # shard 2 has folded nothing yet
        assert (await read_model.checkpoints())["tasks"] < seq
        assert (await first.lag())["tasks"] > 0
        await asyncio.sleep(0.5)
        assert not waiting.done()

        async with running(second):
            assert await waiting  # read-your-writes: both shards have the seq now
            assert (await rows_of(pool, second_org))["tasks"] == 1
            assert await read_model.get_task(second_org, "t1") is not None
            async with asyncio.timeout(10):
                while any((await first.lag()).values()):  # acks reach the server just after the commit
                    await asyncio.sleep(0.05)

        # The second shard is stopped: the first keeps folding, readers are held back.
        await submit(handler, first_org, "t2")
        later = await submit(handler, second_org, "t2")
        await own_checkpoint_reaches(pool, "tasks@1/2", later)
        assert await read_model.get_task(first_org, "t2") is not None
        assert await read_model.get_task(second_org, "t2") is None
        assert not await read_model.wait_for("tasks", later, timeout=0.5)
        assert await read_model.checkpoint("tasks") < later
        assert (await first.lag())["tasks"] > 0  # the stopped shard's consumer has the events pending

        async with running(shards(pool, store, prefix, 2)[1]):  # restarted: it resumes from its row
            assert await read_model.wait_for("tasks", later, timeout=20)
            assert await read_model.get_task(second_org, "t2") is not None
    assert (await read_model.open_tasks())[1] >= later  # the claim index starts from the slowest shard


# --- one layout per database ----------------------------------------------------------------------


async def test_another_shard_count_is_refused_while_one_runs_and_takes_over_once_it_stopped(
    handler: CommandHandler,
    store: JetStreamEventStore,
    pool: asyncpg.Pool,
    reference: asyncpg.Pool,
    prefix: str,
    read_model: ReadModel,
) -> None:
    orgs = orgs_covering(2, 3)
    await play(handler, orgs, seed=21, steps=40)
    first, second = shards(pool, store, prefix, 2)
    async with running(first), running(second):
        await caught_up(first)
        with pytest.raises(ShardLayoutConflict, match=r"running as 1/2, 2/2 .* would run it as 1/3, 2/3, 3/3"):
            await shards(pool, store, prefix, 3)[0].start()
        with pytest.raises(ShardLayoutConflict, match="would run it unsharded"):
            await Projector(pool, store.nc, consumer_prefix=prefix).start()
        with pytest.raises(ProjectionBusy):
            await rebuild(pool, store.nc, consumer_prefix=prefix)
        await second.stop()
        with pytest.raises(ShardLayoutConflict):  # one writer of the 2-shard layout still runs
            await shards(pool, store, prefix, 3)[2].start()
        await play(handler, orgs, seed=22, steps=40)  # folded by shard 1/2 alone: 2/2 falls behind
        await own_checkpoint_reaches(pool, "tasks@1/2", await last_event_seq(store.nc.jetstream()))
    behind = await fetch_checkpoints(pool)
    assert behind["tasks@2/2"] < behind["tasks@1/2"]
    assert await read_model.checkpoint("tasks") == behind["tasks@2/2"]

    # 2 → 3 shards: shard 2/2 is folded up to 1/2 first, then the rows are replaced.
    async with AsyncExitStack() as stack:
        await run_all(stack, shards(pool, store, prefix, 3))
        await play(handler, orgs, seed=23, steps=40)
        await assert_equal_to_reference(store, pool, reference, orgs)
        # Readers that knew the 2-shard rows follow the 3-shard ones from their notifications.
        await notified_checkpoint_reaches(read_model, "tasks", (await fetch_checkpoints(reference))["tasks"])
    assert {key for key in await fetch_checkpoints(pool) if key.startswith("usage")} == {
        "usage@1/3",
        "usage@2/3",
        "usage@3/3",
    }

    # 3 shards → unsharded again.
    async with running(Projector(pool, store.nc, consumer_prefix=prefix, idle_wait=0.2)):
        await play(handler, orgs, seed=24, steps=40)
        await assert_equal_to_reference(store, pool, reference, orgs)
        await notified_checkpoint_reaches(read_model, "tasks", (await fetch_checkpoints(reference))["tasks"])
    assert set(await fetch_checkpoints(pool)) == set(PROJECTIONS)


async def test_rebuild_resets_the_shards_which_then_resume_from_it(
    handler: CommandHandler,
    store: JetStreamEventStore,
    pool: asyncpg.Pool,
    reference: asyncpg.Pool,
    prefix: str,
) -> None:
    orgs = orgs_covering(2)
    js = store.nc.jetstream()
    async with AsyncExitStack() as stack:
        await run_all(stack, shards(pool, store, prefix, 2))
        await play(handler, orgs, seed=31, steps=60)
        await caught_up(Projector(pool, store.nc))
    live = {org: await snapshot(pool, org) for org in orgs}

    report = await rebuild(pool, store.nc, consumer_prefix=prefix)
    assert await fetch_checkpoints(pool) == dict.fromkeys(PROJECTIONS, report.last_seq)  # no shard rows left
    with pytest.raises(NotFoundError):  # nor shard consumers that would resume from their old positions
        await js.consumer_info(STREAM_NAME, shards(pool, store, prefix, 2)[0].consumer_name)
    assert {org: await snapshot(pool, org) for org in orgs} == live

    async with AsyncExitStack() as stack:
        await run_all(stack, shards(pool, store, prefix, 2))
        async with asyncio.timeout(10):
            while "tasks@2/2" not in (rows := await fetch_checkpoints(pool)):
                await asyncio.sleep(0.05)
        assert rows["tasks@1/2"] >= report.last_seq and rows["tasks@2/2"] >= report.last_seq
        await play(handler, orgs, seed=32, steps=30)
        await assert_equal_to_reference(store, pool, reference, orgs)


# --- shards and checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0/2", "numbered 1 to 2"),
        ("3/2", "numbered 1 to 2"),
        ("1/0", "at least 1"),
        ("a/b", "expected INDEX/COUNT"),
        ("2", "expected INDEX/COUNT"),
        ("-1/2", "expected INDEX/COUNT"),
        ("", "expected INDEX/COUNT"),
    ],
)
def test_a_shard_is_index_slash_count_from_one(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_shard(text)


def test_every_org_has_one_stable_shard() -> None:
    def owners(org: str, count: int) -> list[int]:
        return [shard.index for shard in Shard(1, count).siblings() if shard.owns(org)]

    assert parse_shard("2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"
    # Fixed forever: a change would move orgs between running shards (sha256, not Python's hash()).
    golden = {"acme": [[1], [1], [1]], "globex": [[2], [2], [4]], "umbrella": [[1], [3], [1]]}
    assert {org: [owners(org, count) for count in (2, 3, 4)] for org in golden} == golden
    orgs = [f"org-{i}" for i in range(400)]
    for count in (1, 2, 4):
        assert all(len(owners(org, count)) == 1 for org in orgs)
        sizes = [sum(owners(org, count) == [index] for org in orgs) for index in range(1, count + 1)]
        assert min(sizes) > 0.6 * len(orgs) / count  # roughly even


def test_a_sharded_projection_has_the_checkpoint_of_its_slowest_shard() -> None:
    rows = {"tasks@1/2": 9, "tasks@2/2": 7, "workers": 5, "access@1/1": 3}
    assert effective_checkpoints(rows) == {"tasks": 7, "workers": 5, "access": 3}


# --- as separate processes ------------------------------------------------------------------------


async def test_two_projector_processes_split_the_orgs_and_together_equal_one(database_url: str, tmp_path: Path) -> None:
    """``controlplane projector --shard 1/2`` and ``--shard 2/2`` as real processes, on a nats-server of
    their own (the session's stream has projectors with the default consumer names)."""
    orgs = orgs_covering(2, each=2)
    with EmbeddedNats(tmp_path / "nats") as server:
        store = await JetStreamEventStore.connect(server.url)
        try:
            async with fresh_database(database_url) as sharded, fresh_database(database_url) as reference:
                dsn = with_database(database_url, await sharded.fetchval("SELECT current_database()"))
                for database in (sharded, reference):  # the processes migrate too; the test polls meanwhile
                    await migrate(database)
                logs = [tmp_path / f"shard-{index}.log" for index in (1, 2)]
                processes = [
                    await asyncio.create_subprocess_exec(
                        *(CONTROLPLANE, "projector", "--shard", f"{index}/2"),
                        *("--nats-url", server.url, "--database-url", dsn),
                        stdout=log.open("wb"),
                        stderr=asyncio.subprocess.STDOUT,
                        env={**os.environ, "PYTHONPATH": str(REPO)},
                    )
                    for index, log in zip((1, 2), logs, strict=True)
                ]
                try:
                    await play(CommandHandler(store), orgs, seed=23, steps=80)
                    last = await store.last_seq()
                    async with asyncio.timeout(30):
                        while min(effective_checkpoints(await fetch_checkpoints(sharded)).values(), default=0) < last:
                            await asyncio.sleep(0.1)
                finally:
                    for process in processes:
                        process.send_signal(signal.SIGTERM)
                    codes = [await asyncio.wait_for(process.wait(), 20) for process in processes]
                assert codes == [0, 0], [log.read_text() for log in logs]
                assert {key for key in await fetch_checkpoints(sharded) if key.startswith("tasks")} == {
                    "tasks@1/2",
                    "tasks@2/2",
                }
                async with running(Projector(reference, store.nc, idle_wait=0.2)) as unsharded:
                    await caught_up(unsharded)
                for org in orgs:
                    tables = await snapshot(sharded, org)
                    assert tables == await snapshot(reference, org), org
                    assert tables["tasks"], org
        finally:
            await store.close()
