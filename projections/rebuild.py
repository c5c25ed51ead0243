"""Folding a stretch of the log into projections, and rebuilding projections from the log.

:func:`fold_log` reads the events after a sequence up to a target on a consumer of its own and commits
them batch by batch (``projections.commit``): a rebuild folds the whole log so, a projector catches a
lagging projection up with the others so, and a change of shard layout brings lagging shards level so.

:func:`rebuild` empties projections and folds the whole log into them again, reading it once for all of
them, which is what makes rebuilding everything as fast as rebuilding one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from core.domain.ids import new_id
from core.domain.subjects import EVENTS_PREFIX
from core.log.reader import Progress, Puller
from core.log.store import STREAM_NAME
from projections.commit import commit_batch, save_checkpoints
from projections.folds import select
from projections.folds.projection import Projection
from projections.leadership import (
    CONSUMER_PREFIX,
    ProjectionBusy,
    checkpoint_rows,
    delete_consumers,
    layout_locked,
    lead,
)
from projections.schema import migrate
from projections.shards import Shard, parse_checkpoint_key

log = logging.getLogger(__name__)

EVENTS_FILTER = f"{EVENTS_PREFIX}.>"
"""What projections read: every event, never a timer definition (``cpsched.>``)."""
REBUILD_BATCH = 2000
_FETCH_WAIT_SECONDS = 5.0


async def last_event_seq(js: JetStreamContext, stream: str = STREAM_NAME) -> int:
    """Sequence of the newest event (timer definitions excluded); 0 for an empty log. Asked of the
    stream's leader, not by direct get, which a replica behind it may answer."""
    try:
        return (await js.get_last_msg(stream, EVENTS_FILTER)).seq or 0
    except NotFoundError:
        return 0


@dataclass(frozen=True)
class RebuildReport:
    projections: tuple[str, ...]
    events: int
    last_seq: int
    seconds: float
    skipped: int

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def rebuild(
    pool: asyncpg.Pool,
    nc: NATS,
    names: list[str] | None = None,
    progress: Progress | None = None,
    *,
    consumer_prefix: str = CONSUMER_PREFIX,
    stream: str = STREAM_NAME,
    batch_size: int = REBUILD_BATCH,
) -> RebuildReport:
    """Empty the projections' tables, reset their checkpoints to 0 and fold the log again up to the
    newest event present at the start, where a projector resumes (and catches up with whatever was
    appended meanwhile). Their durable consumers are deleted: a projector makes its own at start.
    ``progress(events folded, events to fold)`` is told after each batch.

    Meant to run while no projector runs these projections: it takes their writer locks, every
    shard's included, and raises :class:`ProjectionBusy` if another process holds one. A sharded
    projection is rebuilt unsharded: its shard rows are deleted (and their consumers) in the same
    transaction that empties its tables, so its checkpoint is then its own row, which shard projectors
    adopt when they start. The log is read once for all of them (one consumer; each batch commits
    every projection and its checkpoint in one transaction). An interrupted rebuild leaves consistent
    tables at their last committed checkpoint, from which a projector continues."""
    projections = select(names)
    chosen = [projection.name for projection in projections]
    await migrate(pool)
    started = time.monotonic()
    async with pool.acquire() as conn:
        async with layout_locked(conn, chosen):
            keys = set(chosen) | set(await checkpoint_rows(conn, chosen))
            if not await lead(conn, keys):
                raise ProjectionBusy(
                    f"projection(s) {', '.join(chosen)} are running elsewhere; stop the projector(s) first"
                )
            async with conn.transaction():
                await conn.execute(f"TRUNCATE {', '.join(table for p in projections for table in p.tables)}")
                await conn.execute("DELETE FROM checkpoints WHERE projection = ANY($1::text[])", sorted(keys))
                await save_checkpoints(conn, chosen, 0)
        shards = {parse_checkpoint_key(key)[1] for key in keys}
        await delete_consumers(nc.jetstream(), stream, consumer_prefix, chosen, shards)
        events, last_seq, skipped = await fold_log(conn, nc, stream, projections, batch_size, progress)
    return RebuildReport(tuple(chosen), events, last_seq, time.monotonic() - started, skipped)


async def fold_log(
    conn: asyncpg.Connection,
    nc: NATS,
    stream: str,
    projections: Sequence[Projection],
    batch_size: int,
    progress: Progress | None,
    *,
    shard: Shard | None = None,
    after: int = 0,
    target: int | None = None,
) -> tuple[int, int, int]:
    """Fold the events after seq ``after`` up to ``target`` (default: the newest one present now)
    into ``shard``'s rows (default: unsharded); returns (events, last seq, skipped). The next batch
    is requested before the current one commits, so NATS delivers while PostgreSQL writes."""
    if target is None:
        target = await last_event_seq(nc.jetstream(), stream)
    puller = await Puller.ephemeral(nc, stream, EVENTS_FILTER, start_seq=after + 1, name=f"rebuild-{new_id()}")
    done = skipped = 0
    last_seq = after
    fetch: asyncio.Future[list[Msg]] | None = None
    try:
        if progress is not None:
            progress(0, puller.pending)
        if target > after:
            fetch = asyncio.ensure_future(puller.fetch(batch_size, _FETCH_WAIT_SECONDS))
        while fetch is not None:
            msgs = await fetch
            if not msgs:
                log.warning("the log ended at seq %d, before seq %d: were events deleted?", last_seq, target)
                break
            more = msgs[-1].metadata.sequence.stream < target
            fetch = asyncio.ensure_future(puller.fetch(batch_size, _FETCH_WAIT_SECONDS)) if more else None
            msgs = [msg for msg in msgs if msg.metadata.sequence.stream <= target]  # the rest is a projector's
            if not msgs:
                break
            result = await commit_batch(conn, projections, msgs, shard)
            done, last_seq, skipped = done + len(msgs), result.last_seq, skipped + result.skipped
            if progress is not None:
                progress(done, max(puller.pending, done))
    finally:
        if fetch is not None:  # a read-ahead still in flight when a commit failed
            fetch.cancel()
            with suppress(Exception, asyncio.CancelledError):
                await fetch
        await puller.close()
    return done, last_seq, skipped
