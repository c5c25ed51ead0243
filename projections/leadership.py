"""Who writes a projection, and in which shard layout: the advisory locks that elect each projection's
writer, the checkpoint rows that say how a projection is sharded, and the names of the durable
consumers projectors follow the log with.

One writer per projection. A shared durable consumer splits batches between its fetchers, and a batch
committed out of order would move the checkpoint past one still in flight, so each projection runs
only where its session-level advisory lock is held (:func:`lead`); a projector leads all its
projections or none, and another process running the same ones waits as a standby and takes over
when the locks free up (their holder stopped or its connection died).

One layout per projection and database: its checkpoint rows are either its own row (unsharded) or one
row per shard of one count, never a mix. Rows change layout only under a per-projection layout lock
(:func:`layout_locked`), and only while none of the old layout's writers runs: otherwise a projector
refuses to start with :class:`ShardLayoutConflict` (see ``projections.projector``)."""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager, suppress

import asyncpg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from projections.folds import PROJECTIONS
from projections.shards import Shard, fetch_checkpoints, layout_keys, parse_checkpoint_key

CONSUMER_PREFIX = "proj-"
"""The default start of the projectors' durable consumer names (see :func:`consumer_name`)."""
_LOCK_CLASS = 0x6370  # first key of the two-key advisory locks that elect each projection's writer
_LAYOUT_LOCK_CLASS = 0x6371  # first key of the locks that serialize changes of a projection's shard layout


class ProjectionBusy(RuntimeError):
    """Another process holds the projection (a running projector or rebuild)."""


class ShardLayoutConflict(ProjectionBusy):
    """The projection runs (or its checkpoints are kept) with another shard count than this projector's."""


def _lock_key(name: str) -> int:
    """A stable int4 per checkpoint key (advisory locks take two int4 keys)."""
    return int.from_bytes(zlib.crc32(name.encode()).to_bytes(4, "big"), "big", signed=True)


async def lead(conn: asyncpg.Connection, keys: Collection[str]) -> bool:
    """Take the writer locks of the checkpoint ``keys`` for this session, all or none (on failure it
    releases only what it took: the session may hold other locks)."""
    rows = await conn.fetch(
        "SELECT key, pg_try_advisory_lock($1, key) AS taken FROM unnest($2::int[]) AS key",
        _LOCK_CLASS,
        [_lock_key(key) for key in keys],
    )
    if all(row["taken"] for row in rows):
        return True
    await _unlock(conn, [row["key"] for row in rows if row["taken"]])
    return False


async def release(conn: asyncpg.Connection, keys: Collection[str]) -> None:
    """Give up the writer locks of the checkpoint ``keys`` that :func:`lead` took."""
    await _unlock(conn, [_lock_key(key) for key in keys])


async def _unlock(conn: asyncpg.Connection, lock_keys: Sequence[int]) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, key) FROM unnest($2::int[]) AS key", _LOCK_CLASS, lock_keys)


@asynccontextmanager
async def layout_locked(conn: asyncpg.Connection, names: Sequence[str]) -> AsyncIterator[None]:
    """Hold the layout locks of ``names`` (waiting for them, in a fixed order so that two holders
    cannot deadlock): checkpoint rows change layout only under them."""
    ordered = sorted({_lock_key(name) for name in names})
    await conn.execute("SELECT pg_advisory_lock($1, key) FROM unnest($2::int[]) AS key", _LAYOUT_LOCK_CLASS, ordered)
    try:
        yield
    finally:
        await conn.execute(
            "SELECT pg_advisory_unlock($1, key) FROM unnest($2::int[]) AS key", _LAYOUT_LOCK_CLASS, ordered
        )


async def checkpoint_rows(conn: asyncpg.Connection, names: Sequence[str]) -> dict[str, int]:
    """Every checkpoint row of the projections ``names``, their shards' included."""
    return {key: seq for key, seq in (await fetch_checkpoints(conn)).items() if parse_checkpoint_key(key)[0] in names}


def describe_layout(keys: Collection[str]) -> str:
    shards = {shard for _, shard in map(parse_checkpoint_key, keys)}
    if shards == {None}:
        return "unsharded"
    return f"as {', '.join(sorted(str(shard) for shard in shards if shard is not None))}"


def previous_layout(name: str, rows: dict[str, int], mine: list[str]) -> dict[str, int]:
    """The rows of ``name`` when they are another layout than ``mine`` (empty when they are ``mine``
    or absent). Raises if they are not one whole layout (edited by hand, or a bug): no conversion
    can be exact then."""
    if set(rows) == set(mine) or not rows:
        return {}
    some_key = next(iter(rows))
    _, shard = parse_checkpoint_key(some_key)
    if set(rows) != set(layout_keys(name, shard)):
        raise ShardLayoutConflict(
            f"the checkpoints of projection {name} ({', '.join(sorted(rows))}) are not one whole shard layout; "
            f"rebuild it (controlplane projections rebuild {name})"
        )
    return rows


def running_elsewhere(name: str, previous: Collection[str], mine: Collection[str]) -> ShardLayoutConflict:
    return ShardLayoutConflict(
        f"projection {name} is running {describe_layout(previous)} (a projector or a rebuild holds it) and this "
        f"projector would run it {describe_layout(mine)}; one database takes one shard layout at a time: stop "
        "those processes first, and this projector takes over from their checkpoints"
    )


_ALL_PROJECTIONS = "all"
_GROUP_SEPARATOR = "_"
_SHARD_SUFFIX = re.compile(r"-shard-(\d+)-of-(\d+)$")


def consumer_name(prefix: str, names: Sequence[str], shard: Shard | None) -> str:
    """The durable consumer of a projector following ``names`` together as ``shard`` (or unsharded):
    ``<prefix>all`` for every projection, else ``<prefix><name>_<name>…``, plus ``-shard-<i>-of-<n>``
    for a shard (consumer names may not hold ``/``)."""
    group = _ALL_PROJECTIONS if set(names) == set(PROJECTIONS) else _GROUP_SEPARATOR.join(names)
    return f"{prefix}{group}" if shard is None else f"{prefix}{group}-shard-{shard.index}-of-{shard.count}"


def _consumer_covers(prefix: str, consumer: str) -> tuple[set[str], Shard | None] | None:
    """The projections and shard a consumer made by :func:`consumer_name` with ``prefix`` follows, or
    None for another consumer."""
    if not consumer.startswith(prefix):
        return None
    group = consumer[len(prefix) :]
    shard: Shard | None = None
    if match := _SHARD_SUFFIX.search(group):
        shard, group = Shard(int(match[1]), int(match[2])), group[: match.start()]
    names = set(PROJECTIONS) if group == _ALL_PROJECTIONS else set(group.split(_GROUP_SEPARATOR))
    return (names, shard) if names <= set(PROJECTIONS) else None


async def delete_consumers(
    js: JetStreamContext, stream: str, prefix: str, names: Collection[str], shards: Collection[Shard | None]
) -> None:
    """Delete the consumers made with ``prefix`` that follow any of ``names`` as one of ``shards``: nothing
    may resume from a position its projections' rows no longer match."""
    for info in await js.consumers_info(stream):
        covered = _consumer_covers(prefix, info.name)
        if covered is not None and covered[0] & set(names) and covered[1] in shards:
            with suppress(NotFoundError):
                await js.delete_consumer(stream, info.name)
