"""Keeps the read model up to date: one durable JetStream pull consumer for all of a projector's
projections, each batch folded into PostgreSQL in one transaction together with every projection's
checkpoint.

Exactly once, restartable. A batch, its rows and the checkpoints (stream sequence of its last message)
commit together; the batch is acked after the commit (one ack: the consumer acks all up to the one
acked). A crash between commit and ack therefore redelivers messages at or below the checkpoints,
which the next transaction skips. The checkpoints in PostgreSQL are the truth and the consumer only a
cursor: whenever a projector (re)starts it recreates its consumer at checkpoint + 1, so a restored or
rebuilt database and its consumer always agree (the consumer is kept in memory on the server for the
same reason: losing it costs nothing).

One consumer and one transaction for the projections together, not one each: every event is then
delivered, decoded and committed once rather than once per projection, which was most of the
projector's cost per event. A projection that lags the others when the projector starts (a new one, or
one just rebuilt) first catches up with them from the log, as a rebuild reads it, and then they
follow together. The price: a projection whose code fails on an event (a bug, not bad data: refused
data is skipped, see ``projections.commit``) holds the others back with it until it is fixed.

One writer per projection: each runs only where its advisory lock is held, and another process running
the same ones stands by until the locks free up (``projections.leadership``).

Consumers filter ``cp.>``, not single aggregates, so every projection's checkpoint advances with
every event and "wait until projection X reached seq N" works for any N. Timer definitions on
``cpsched.>`` never reach a projection; the events they fire are ordinary events on ``cp.>``.

Sharded by org. A projector made with ``shard=Shard(i, n)`` (``controlplane projector --shard i/n``)
folds only the events of the orgs shard i of n owns (a sha256 of the org id, so every process agrees),
with its own durable consumer, writer lock and checkpoint row ``<projection>@i/n``. Its consumer still
reads all of ``cp.>`` and skips other orgs' events before decoding them: so each shard's checkpoint
advances with every event, and "projection X reached N" means every shard of X did (readers take the
minimum, ``schema.effective_checkpoints``). n shards together write exactly what one projector writes.
Not server-side filters: orgs appear at any time, and a consumer listing its orgs' subjects would have
to be updated on every new org, racing with that org's first events.

One layout per projection and database (``projections.leadership``). A writer that takes over a
projection adopts the layout under a per-projection advisory lock. Rows of another layout are converted
only while none of that layout's writers runs: lagging shards are first folded up to the most advanced
one, then the rows are replaced by the new layout's at that sequence, which is exact because every org
has then been folded that far. So going from 1 to n shards, n to m or back to 1 needs only stopping the
old processes first; while they run, :meth:`Projector.start` raises :class:`ShardLayoutConflict`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from core import telemetry
from core.log.reader import Puller
from core.log.store import H_TRACEPARENT, STREAM_NAME
from projections.commit import commit_batch, save_checkpoints
from projections.folds import select
from projections.folds.cache import StateCache
from projections.folds.projection import Projection
from projections.leadership import (
    CONSUMER_PREFIX,
    ShardLayoutConflict,
    checkpoint_rows,
    consumer_name,
    delete_consumers,
    describe_layout,
    layout_locked,
    lead,
    previous_layout,
    release,
    running_elsewhere,
)
from projections.rebuild import EVENTS_FILTER, REBUILD_BATCH, fold_log, last_event_seq
from projections.schema import migrate
from projections.shards import (
    Shard,
    checkpoint_key,
    effective_checkpoints,
    fetch_checkpoints,
    layout_keys,
    layout_of,
    parse_checkpoint_key,
)

log = logging.getLogger(__name__)

LIVE_BATCH = 500
GATHER_SECONDS = 0.010
"""How long a small live batch waits for more events before it is committed (see ``Projector``)."""
GATHER_BELOW = 64
ACK_WAIT_SECONDS = 120.0
_RETRY_MIN_SECONDS = 0.5
_RETRY_MAX_SECONDS = 5.0
_STANDBY_RETRY_SECONDS = 2.0


class Projector:
    """Runs projections (all by default) until stopped, together on one durable consumer and one
    PostgreSQL connection (the session that owns their writer locks), each with its own checkpoint.
    ``start`` applies the migrations,
    so it is safe on a fresh database. With a ``shard`` it folds only that shard's orgs (see the
    module's description); the read-side methods (``checkpoints``, ``lag``, ``run_until_caught_up``)
    answer for the projection as a whole, whichever layout runs it, so any projector object asks them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NATS,
        *,
        names: Sequence[str] | None = None,
        shard: Shard | None = None,
        consumer_prefix: str = CONSUMER_PREFIX,
        stream: str = STREAM_NAME,
        batch_size: int = LIVE_BATCH,
        idle_wait: float = 1.0,
        gather: float = GATHER_SECONDS,
    ) -> None:
        """``consumer_prefix`` names the durable consumer (``<prefix>all``, see :func:`_consumer_name`);
        databases fed from one stream need distinct prefixes, and every projector of one database (each
        shard, or unsharded) the same one. ``idle_wait`` is how long one fetch lingers for new events; events
        that arrive meanwhile are delivered at once, so it bounds nothing but idle polling. A batch of fewer than
        ``GATHER_BELOW`` events waits ``gather`` seconds for the events behind it and takes them along: a
        transaction, its checkpoint rows and an acknowledgement cost about as much for one event as for
        fifty, and under a steady load events come one or two at a time. It delays the read models by at
        most ``gather`` (0 turns it off); claims, SSE feeds and the command handler never wait for them."""
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._projections = select(names)
        self._shard = shard
        self._prefix = consumer_prefix
        self._stream = stream
        self._batch_size = batch_size
        self._idle_wait = idle_wait
        self._gather = gather
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped: asyncio.Future[None] | None = None
        self.committed: dict[str, int] = {projection.name: 0 for projection in self._projections}
        """Messages each projection has committed since this projector was made (a metric)."""
        self.skipped: dict[str, int] = {projection.name: 0 for projection in self._projections}
        """Events each projection skipped because they could not be decoded, folded or stored (a metric)."""

    @property
    def names(self) -> list[str]:
        return [projection.name for projection in self._projections]

    @property
    def consumer_prefix(self) -> str:
        return self._prefix

    @property
    def consumer_name(self) -> str:
        return consumer_name(self._prefix, self.names, self._shard)

    async def start(self) -> None:
        """Start following the log. Raises :class:`ShardLayoutConflict` while another shard layout
        runs one of the projections (see the module's description)."""
        if self._tasks:
            raise RuntimeError("the projector is already running")
        await migrate(self._pool)
        async with self._pool.acquire() as conn:
            for projection in self._projections:
                await self._refuse_other_running_layout(conn, projection.name)
        self._stopped = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._run(self._stopped), name="projector")]

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the batch in hand (commit and ack it), then stop; cancels what takes longer than ``grace``."""
        if self._stopped is None:
            return
        self._stopped.set_result(None)
        _, hanging = await asyncio.wait(self._tasks, timeout=grace)
        for task in hanging:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks, self._stopped = [], None

    async def checkpoints(self) -> dict[str, int]:
        """Each projection's checkpoint as readers see it: with shards, the one every shard reached."""
        effective = effective_checkpoints(await fetch_checkpoints(self._pool))
        return {name: effective.get(name, 0) for name in self.names}

    async def lag(self) -> dict[str, int]:
        """Events each projection has yet to commit: the consumer's pending plus unacked messages,
        and with shards the most of any shard (readers wait for the slowest). A consumer that does
        not exist (another projector of this database follows other projections, or none runs) counts
        the sequences between the checkpoint and the newest event, an upper bound."""
        rows = await fetch_checkpoints(self._pool)
        newest: int | None = None
        lag: dict[str, int] = {}
        for name in self.names:
            behind: list[int] = []
            for key, checkpoint in (layout_of(rows, name) or {name: 0}).items():
                try:
                    consumer = consumer_name(self._prefix, self.names, parse_checkpoint_key(key)[1])
                    info = await self._js.consumer_info(self._stream, consumer)
                except NotFoundError:
                    if newest is None:
                        newest = await last_event_seq(self._js, self._stream)
                    behind.append(max(0, newest - checkpoint))
                    continue
                behind.append(info.num_pending + info.num_ack_pending)
            lag[name] = max(behind)
        return lag

    async def run_until_caught_up(self) -> None:
        """Wait until every projection has committed the newest event present when called (bound it
        with ``asyncio.timeout``); with shards, until every shard has. Polls the checkpoints table, so
        it also works while other processes lead the projections."""
        target = await last_event_seq(self._js, self._stream)
        while True:
            if min((await self.checkpoints()).values(), default=target) >= target:
                return
            await asyncio.sleep(0.02)

    async def _refuse_other_running_layout(self, conn: asyncpg.Connection, name: str) -> None:
        """Fail fast at start rather than stand by forever behind another layout's writers."""
        mine = layout_keys(name, self._shard)
        async with layout_locked(conn, [name]):
            previous = previous_layout(name, await checkpoint_rows(conn, [name]), mine)
            if not previous:
                return
            if not await lead(conn, previous):
                raise running_elsewhere(name, previous, mine)
            await release(conn, previous)

    async def _run(self, stopped: asyncio.Future[None]) -> None:
        """Lead the projections (or stand by for them) until stopped. An error restarts them from their
        checkpoints after a pause that grows while no batch gets committed: never a crash loop."""
        keys = [checkpoint_key(name, self._shard) for name in self.names]
        retry = _RETRY_MIN_SECONDS
        standby_logged = False
        while not stopped.done():
            committed = sum(self.committed.values())
            try:
                async with self._pool.acquire() as conn:
                    if await lead(conn, keys):
                        standby_logged = False
                        await self._follow(conn, stopped)  # the pool's reset of the connection unlocks
                        continue
                if not standby_logged:
                    log.info("projections %s run elsewhere; standing by", ", ".join(keys))
                    standby_logged = True
                await asyncio.wait((stopped,), timeout=_STANDBY_RETRY_SECONDS)
            except ShardLayoutConflict as exc:  # another layout started meanwhile: a configuration error
                log.error("%s; retrying in %.1fs", exc, _STANDBY_RETRY_SECONDS)
                await asyncio.wait((stopped,), timeout=_STANDBY_RETRY_SECONDS)
            except Exception:
                if sum(self.committed.values()) > committed:
                    retry = _RETRY_MIN_SECONDS
                log.exception(
                    "projections %s failed; restarting from their checkpoints in %.1fs", ", ".join(keys), retry
                )
                await asyncio.wait((stopped,), timeout=retry)
                retry = min(2 * retry, _RETRY_MAX_SECONDS)

    async def _follow(self, conn: asyncpg.Connection, stopped: asyncio.Future[None]) -> None:
        start = await self._catch_up(conn)
        consumer = self.consumer_name
        await _recreate_consumer(self._js, self._stream, consumer, start + 1, self._batch_size)
        puller = Puller(self._nc, self._stream, consumer)
        cache = StateCache()  # one per leadership: this process saw nothing of what happened while it did not lead
        log.info("projections %s following %s from seq %d", ", ".join(self.names), self._stream, start + 1)
        try:
            while (msgs := await self._next_batch(puller, stopped)) is not None:
                if msgs:
                    traced = _batch_trace(self._projections, msgs)
                    with (
                        telemetry.span("project", traced[0], parent=traced[1], links=traced[2])
                        if traced is not None
                        else nullcontext()
                    ) as span:
                        result = await commit_batch(conn, self._projections, msgs, self._shard, cache)
                        telemetry.set_attributes(span, {"cp.skipped": result.skipped})
                    for name, refused in result.refused.items():
                        self.committed[name] += len(msgs)
                        self.skipped[name] += result.undecodable + refused
                    await msgs[-1].ack()  # acks the whole batch (AckPolicy.ALL)
        finally:
            await puller.close()

    async def _catch_up(self, conn: asyncpg.Connection) -> int:
        """Adopt every projection's layout, fold the ones behind the others up to the most advanced
        checkpoint (from the log, as a rebuild does), and return that checkpoint: where they then
        follow together."""
        checkpoints = {projection.name: await self._adopt_layout(conn, projection) for projection in self._projections}
        start = max(checkpoints.values())
        behind = [projection for projection in self._projections if checkpoints[projection.name] < start]
        if behind:
            after = min(checkpoints.values())
            log.info(
                "projections %s catch up from seq %d to %d",
                ", ".join(projection.name for projection in behind),
                after,
                start,
            )
            await fold_log(
                conn, self._nc, self._stream, behind, REBUILD_BATCH, None, shard=self._shard, after=after, target=start
            )
        return start

    async def _adopt_layout(self, conn: asyncpg.Connection, projection: Projection) -> int:
        """Make the projection's checkpoint rows this projector's layout and return its own row's
        sequence. Called holding this projector's writer lock; converts another layout's rows only
        when none of its writers runs (see the module's description)."""
        name = projection.name
        mine = layout_keys(name, self._shard)
        async with layout_locked(conn, [name]):
            rows = await checkpoint_rows(conn, [name])
            previous = previous_layout(name, rows, mine)
            if not previous:
                if not rows:
                    await save_checkpoints(conn, mine, 0)
                return rows.get(checkpoint_key(name, self._shard), 0)
            if not await lead(conn, previous):
                raise running_elsewhere(name, previous, mine)
            target = max(previous.values())
            try:
                for key, checkpoint in previous.items():
                    if checkpoint < target:
                        _, shard = parse_checkpoint_key(key)
                        log.info("projection %s: folding %s up to seq %d before the layout changes", name, key, target)
                        await fold_log(
                            conn,
                            self._nc,
                            self._stream,
                            [projection],
                            REBUILD_BATCH,
                            None,
                            shard=shard,
                            after=checkpoint,
                            target=target,
                        )
                async with conn.transaction():
                    await conn.execute("DELETE FROM checkpoints WHERE projection = ANY($1::text[])", list(previous))
                    await save_checkpoints(conn, mine, target)
            finally:
                await release(conn, previous)
        previous_shards = {parse_checkpoint_key(key)[1] for key in previous}
        await delete_consumers(self._js, self._stream, self._prefix, [name], previous_shards)
        log.info(
            "projection %s now runs %s from seq %d (was %s)",
            name,
            describe_layout(mine),
            target,
            describe_layout(previous),
        )
        return target

    async def _next_batch(self, puller: Puller, stopped: asyncio.Future[None]) -> list[Msg] | None:
        """The next batch ([] when none came within ``idle_wait``), or None once stopped."""
        if stopped.done():
            return None
        fetch = asyncio.ensure_future(puller.fetch(self._batch_size, self._idle_wait))
        await asyncio.wait((fetch, stopped), return_when=asyncio.FIRST_COMPLETED)
        if fetch.done():
            batch = fetch.result()
            if 0 < len(batch) < GATHER_BELOW and self._gather > 0 and not stopped.done():
                await asyncio.sleep(self._gather)
                # What arrived meanwhile, without a request: the batch in hand is committed whatever NATS does.
                batch += puller.take(self._batch_size - len(batch))
            return batch
        fetch.cancel()
        with suppress(asyncio.CancelledError):
            await fetch
        return None


def _batch_trace(
    projections: Sequence[Projection], msgs: Sequence[Msg]
) -> tuple[dict[str, Any], str | None, list[str]] | None:
    """The attributes, parent and links of a batch's span, or None for no span: tracing is off, or no
    event of the batch is of an aggregate a projection reads (the projector sees every event, and a
    span per batch of events it ignores would cost more than it tells). The batch joins
    the trace of its first traced event (at low load a batch holds one task's events, whose trace then
    shows when the read model got them) and links the traces of the others, up to ``telemetry.MAX_LINKS``."""
    if not telemetry.enabled():
        return None
    if not any(projection.reads(_aggregate_of(msg.subject)) for msg in msgs for projection in projections):
        return None
    traced = [value for msg in msgs if msg.headers and (value := msg.headers.get(H_TRACEPARENT))]
    attributes = {
        "cp.projections": ",".join(projection.name for projection in projections),
        "cp.events": len(msgs),
        "cp.first_seq": msgs[0].metadata.sequence.stream,
        "cp.last_seq": msgs[-1].metadata.sequence.stream,
    }
    return attributes, traced[0] if traced else None, traced[1:]


def _aggregate_of(subject: str) -> str:
    """``cp.<org>.<aggregate>.<id>``'s aggregate, without validating (``decode`` reports bad subjects)."""
    parts = subject.split(".", 3)
    return parts[2] if len(parts) == 4 else ""


async def _recreate_consumer(js: JetStreamContext, stream: str, name: str, start_seq: int, batch_size: int) -> None:
    """Point the durable consumer ``name`` at ``start_seq``, whatever it pointed at before."""
    with suppress(NotFoundError):
        await js.delete_consumer(stream, name)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.ALL,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=2 * batch_size,
            filter_subject=EVENTS_FILTER,
            mem_storage=True,
        ),
    )
