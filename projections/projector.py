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
data is skipped, see :func:`_apply_bisecting`) holds the others back with it until it is fixed.

One writer per projection. A shared durable consumer splits batches between its fetchers, and a
batch committed out of order would move the checkpoint past one still in flight, so each projection
runs only where its session-level advisory lock is held; a projector leads all its projections or
none, and another process running the same ones waits as a standby and takes over when the locks free
up (their holder stopped or its connection died).

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

One layout per projection and database: its checkpoint rows are either its own row (unsharded) or one
row per shard of one count, never a mix. A writer that takes over a projection adopts the layout under
a per-projection advisory lock. Rows of another layout are converted only while none of that layout's
writers runs: lagging shards are first folded up to the most advanced one, then the rows are replaced by
the new layout's at that sequence, which is exact because every org has then been folded that far. So
going from 1 to n shards, n to m or back to 1 needs only stopping the old processes first; while they
run, :meth:`Projector.start` raises :class:`ShardLayoutConflict`."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from core import telemetry
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.subjects import EVENTS_PREFIX, parse_aggregate_subject
from core.log.pull import Puller
from core.log.store import H_TRACEPARENT, STREAM_NAME, recorded_from_message
from projections.folds import PROJECTIONS, Projection, select
from projections.schema import (
    NOTIFY_CHANNEL,
    Shard,
    checkpoint_key,
    effective_checkpoints,
    fetch_checkpoints,
    layout_keys,
    layout_of,
    migrate,
    parse_checkpoint_key,
)

log = logging.getLogger(__name__)

EVENTS_FILTER = f"{EVENTS_PREFIX}.>"
CONSUMER_PREFIX = "proj-"
LIVE_BATCH = 500
REBUILD_BATCH = 2000
ACK_WAIT_SECONDS = 120.0
_LOCK_CLASS = 0x6370  # first key of the two-key advisory locks that elect each projection's writer
_LAYOUT_LOCK_CLASS = 0x6371  # first key of the locks that serialize changes of a projection's shard layout
_RETRY_MIN_SECONDS = 0.5
_RETRY_MAX_SECONDS = 5.0
_STANDBY_RETRY_SECONDS = 2.0
_REBUILD_WAIT_SECONDS = 5.0

Progress = Callable[[int, int], None]
"""``progress(events folded, events to fold)``."""


class ProjectionBusy(RuntimeError):
    """Another process holds the projection (a running projector or rebuild)."""


class ShardLayoutConflict(ProjectionBusy):
    """The projection runs (or its checkpoints are kept) with another shard count than this projector's."""


@dataclass(frozen=True)
class BatchResult:
    last_seq: int
    """Stream sequence of the batch's last message: the new checkpoint of every projection applied."""
    applied: tuple[str, ...]
    """The projections whose checkpoint was below ``last_seq``; the others had seen the whole batch."""
    undecodable: int
    """Messages of the batch that could not be read as events."""
    refused: dict[str, int]
    """Per applied projection, the events it could not fold or store."""

    @property
    def skipped(self) -> int:
        """Undecodable messages plus, summed over the applied projections, events a projection refused."""
        return self.undecodable + sum(self.refused.values())


def decode(msgs: Sequence[Msg]) -> tuple[list[RecordedEvent], int]:
    """The batch's events and how many messages could not be read. An undecodable message is logged
    with its sequence and subject and skipped: one bad event must not stop a projection forever."""
    recorded: list[RecordedEvent] = []
    failures = 0
    for msg in msgs:
        try:
            item = recorded_from_message(msg)
            parse_aggregate_subject(item.subject)
        except Exception as exc:
            failures += 1
            seq = msg.metadata.sequence.stream
            log.error("skipping undecodable event seq=%d subject=%s: %s", seq, msg.subject, exc)
            continue
        recorded.append(item)
    return recorded, failures


_SAVE_CHECKPOINTS = f"""
WITH saved AS (
    INSERT INTO checkpoints (projection, seq, updated_at) SELECT unnest($1::text[]), $2, now()
    ON CONFLICT (projection) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at
    RETURNING projection, seq
)
SELECT pg_notify('{NOTIFY_CHANNEL}', projection || ':' || seq) FROM saved
"""


POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)
"""Errors an event's own data causes (a value out of a column's range, …): retrying cannot help."""


def owned_by(shard: Shard, msgs: Sequence[Msg]) -> list[Msg]:
    """The messages of ``shard``'s orgs, found from the subject alone (decoding the others would be
    wasted). A subject that is no event subject is kept, for :func:`decode` to report."""
    owned: list[Msg] = []
    for msg in msgs:
        try:
            org = parse_aggregate_subject(msg.subject).org
        except ValueError:
            owned.append(msg)
            continue
        if shard.owns(org):
            owned.append(msg)
    return owned


async def commit_batch(
    conn: asyncpg.Connection, projections: Sequence[Projection], msgs: Sequence[Msg], shard: Shard | None = None
) -> BatchResult:
    """Fold one fetched batch into ``projections`` and move their checkpoints to its last sequence,
    all in one transaction. Messages at or below a projection's checkpoint were committed before (a
    crash between commit and ack) and are skipped, so applying a batch twice changes nothing. If
    PostgreSQL refuses some data, the transaction is rolled back and the batch applied again with each
    projection in a savepoint, see :func:`_apply_bisecting`.
    With a ``shard``, only its orgs' events are folded, and the checkpoints moved are the shard's rows."""
    recorded, undecodable = decode(msgs if shard is None else owned_by(shard, msgs))
    last_seq = msgs[-1].metadata.sequence.stream
    keys = {projection.name: checkpoint_key(projection.name, shard) for projection in projections}
    try:
        refused = await _commit(conn, projections, keys, recorded, last_seq, _apply_all)
    except POISON:  # rolled back: again, each projection in a savepoint, to find and skip what is refused
        refused = await _commit(conn, projections, keys, recorded, last_seq, _apply_bisecting)
    return BatchResult(last_seq, tuple(refused), undecodable, refused)


Apply = Callable[[asyncpg.Connection, Projection, list[RecordedEvent]], Awaitable[int]]


async def _commit(
    conn: asyncpg.Connection,
    projections: Sequence[Projection],
    keys: dict[str, str],
    recorded: list[RecordedEvent],
    last_seq: int,
    apply: Apply,
) -> dict[str, int]:
    """One transaction: the events newer than each projection's checkpoint applied with ``apply``, and
    the checkpoints moved to ``last_seq``; returns what each projection that applied refused."""
    refused: dict[str, int] = {}
    async with conn.transaction():
        # Asynchronous commit: a server crash may lose the last batches, rows and checkpoint together,
        # and they are folded again from the log. Not waiting for the WAL flush is most of a small batch's cost.
        await conn.execute("SET LOCAL cp.projector = 'on'; SET LOCAL synchronous_commit = off")
        rows = await conn.fetch(
            "SELECT projection, seq FROM checkpoints WHERE projection = ANY($1::text[]) FOR UPDATE",
            list(keys.values()),
        )
        checkpoints = {row["projection"]: row["seq"] for row in rows}
        for projection in projections:
            checkpoint = checkpoints.get(keys[projection.name], 0)
            if last_seq <= checkpoint:
                continue
            newer = [item for item in recorded if item.seq > checkpoint]
            refused[projection.name] = await apply(conn, projection, newer)
        if refused:
            await conn.execute(_SAVE_CHECKPOINTS, [keys[name] for name in refused], last_seq)
    return refused


async def _apply_all(conn: asyncpg.Connection, projection: Projection, events: list[RecordedEvent]) -> int:
    """The common case: PostgreSQL takes every row, and no savepoint per projection is paid for."""
    return await projection.apply(conn, events)


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


async def _apply_bisecting(conn: asyncpg.Connection, projection: Projection, events: list[RecordedEvent]) -> int:
    """Apply ``events`` in a savepoint; if PostgreSQL refuses their data, apply each half on its own,
    down to the single events it refuses, which are logged and skipped (like undecodable ones) so
    that one event cannot wedge a projection. Applying in pieces folds the same as applying at once
    (each piece loads what the previous one wrote), so live and rebuilt tables still agree."""
    try:
        async with conn.transaction():
            return await projection.apply(conn, events)
    except POISON as exc:
        if len(events) == 1:
            item = events[0]
            kind = type(item.event).__name__
            log.error("%s skips %s seq=%d subject=%s: %s", projection.name, kind, item.seq, item.subject, exc)
            return 1
    middle = len(events) // 2
    return await _apply_bisecting(conn, projection, events[:middle]) + await _apply_bisecting(
        conn, projection, events[middle:]
    )


async def last_event_seq(js: JetStreamContext, stream: str = STREAM_NAME) -> int:
    """Sequence of the newest event (timer definitions excluded); 0 for an empty log."""
    try:
        return (await js.get_last_msg(stream, EVENTS_FILTER)).seq or 0
    except NotFoundError:
        return 0


def _lock_key(name: str) -> int:
    """A stable int4 per checkpoint key (advisory locks take two int4 keys)."""
    return int.from_bytes(zlib.crc32(name.encode()).to_bytes(4, "big"), "big", signed=True)


async def _lead(conn: asyncpg.Connection, keys: Collection[str]) -> bool:
    """Take the writer locks of the checkpoint ``keys`` for this session, all or none (on failure it
    releases only what it took: the session may hold other locks)."""
    rows = await conn.fetch(
        "SELECT key, pg_try_advisory_lock($1, key) AS taken FROM unnest($2::int[]) AS key",
        _LOCK_CLASS,
        [_lock_key(key) for key in keys],
    )
    if all(row["taken"] for row in rows):
        return True
    await _release(conn, [row["key"] for row in rows if row["taken"]])
    return False


async def _release(conn: asyncpg.Connection, lock_keys: Sequence[int]) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, key) FROM unnest($2::int[]) AS key", _LOCK_CLASS, lock_keys)


@asynccontextmanager
async def _layout_locked(conn: asyncpg.Connection, names: Sequence[str]) -> AsyncIterator[None]:
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


async def _checkpoint_rows(conn: asyncpg.Connection, names: Sequence[str]) -> dict[str, int]:
    """Every checkpoint row of the projections ``names``, their shards' included."""
    return {key: seq for key, seq in (await fetch_checkpoints(conn)).items() if parse_checkpoint_key(key)[0] in names}


def _describe(keys: Collection[str]) -> str:
    shards = {shard for _, shard in map(parse_checkpoint_key, keys)}
    if shards == {None}:
        return "unsharded"
    return f"as {', '.join(sorted(str(shard) for shard in shards if shard is not None))}"


def _previous_layout(name: str, rows: dict[str, int], mine: list[str]) -> dict[str, int]:
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


def _running_elsewhere(name: str, previous: Collection[str], mine: Collection[str]) -> ShardLayoutConflict:
    return ShardLayoutConflict(
        f"projection {name} is running {_describe(previous)} (a projector or a rebuild holds it) and this "
        f"projector would run it {_describe(mine)}; one database takes one shard layout at a time: stop those "
        "processes first, and this projector takes over from their checkpoints"
    )


_ALL_PROJECTIONS = "all"
_GROUP_SEPARATOR = "_"
_SHARD_SUFFIX = re.compile(r"-shard-(\d+)-of-(\d+)$")


def _consumer_name(prefix: str, names: Sequence[str], shard: Shard | None) -> str:
    """The durable consumer of a projector following ``names`` together as ``shard`` (or unsharded):
    ``<prefix>all`` for every projection, else ``<prefix><name>_<name>…``, plus ``-shard-<i>-of-<n>``
    for a shard (consumer names may not hold ``/``)."""
    group = _ALL_PROJECTIONS if set(names) == set(PROJECTIONS) else _GROUP_SEPARATOR.join(names)
    return f"{prefix}{group}" if shard is None else f"{prefix}{group}-shard-{shard.index}-of-{shard.count}"


def _consumer_covers(prefix: str, consumer: str) -> tuple[set[str], Shard | None] | None:
    """The projections and shard a consumer made by :func:`_consumer_name` with ``prefix`` follows, or
    None for another consumer."""
    if not consumer.startswith(prefix):
        return None
    group = consumer[len(prefix) :]
    shard: Shard | None = None
    if match := _SHARD_SUFFIX.search(group):
        shard, group = Shard(int(match[1]), int(match[2])), group[: match.start()]
    names = set(PROJECTIONS) if group == _ALL_PROJECTIONS else set(group.split(_GROUP_SEPARATOR))
    return (names, shard) if names <= set(PROJECTIONS) else None


async def _delete_consumers(
    js: JetStreamContext, stream: str, prefix: str, names: Collection[str], shards: Collection[Shard | None]
) -> None:
    """Delete the consumers made with ``prefix`` that follow any of ``names`` as one of ``shards``: nothing
    may resume from a position its projections' rows no longer match."""
    for info in await js.consumers_info(stream):
        covered = _consumer_covers(prefix, info.name)
        if covered is not None and covered[0] & set(names) and covered[1] in shards:
            with suppress(NotFoundError):
                await js.delete_consumer(stream, info.name)


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
    ) -> None:
        """``consumer_prefix`` names the durable consumer (``<prefix>all``, see :func:`_consumer_name`);
        databases fed from one stream need distinct prefixes, and every projector of one database (each
        shard, or unsharded) the same one. ``idle_wait`` is how long one fetch lingers for new events; events
        that arrive meanwhile are delivered at once, so it bounds nothing but idle polling."""
        self._pool = pool
        self._nc = nc
        self._js = nc.jetstream()
        self._projections = select(names)
        self._shard = shard
        self._prefix = consumer_prefix
        self._stream = stream
        self._batch_size = batch_size
        self._idle_wait = idle_wait
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
        return _consumer_name(self._prefix, self.names, self._shard)

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
                    consumer = _consumer_name(self._prefix, self.names, parse_checkpoint_key(key)[1])
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
        async with _layout_locked(conn, [name]):
            previous = _previous_layout(name, await _checkpoint_rows(conn, [name]), mine)
            if not previous:
                return
            if not await _lead(conn, previous):
                raise _running_elsewhere(name, previous, mine)
            await _release(conn, [_lock_key(key) for key in previous])

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
                    if await _lead(conn, keys):
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
                        result = await commit_batch(conn, self._projections, msgs, self._shard)
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
            await _fold_log(
                conn, self._nc, self._stream, behind, REBUILD_BATCH, None, shard=self._shard, after=after, target=start
            )
        return start

    async def _adopt_layout(self, conn: asyncpg.Connection, projection: Projection) -> int:
        """Make the projection's checkpoint rows this projector's layout and return its own row's
        sequence. Called holding this projector's writer lock; converts another layout's rows only
        when none of its writers runs (see the module's description)."""
        name = projection.name
        mine = layout_keys(name, self._shard)
        async with _layout_locked(conn, [name]):
            rows = await _checkpoint_rows(conn, [name])
            previous = _previous_layout(name, rows, mine)
            if not previous:
                if not rows:
                    await conn.execute(_SAVE_CHECKPOINTS, mine, 0)
                return rows.get(checkpoint_key(name, self._shard), 0)
            if not await _lead(conn, previous):
                raise _running_elsewhere(name, previous, mine)
            target = max(previous.values())
            try:
                for key, checkpoint in previous.items():
                    if checkpoint < target:
                        _, shard = parse_checkpoint_key(key)
                        log.info("projection %s: folding %s up to seq %d before the layout changes", name, key, target)
                        await _fold_log(
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
                    await conn.execute(_SAVE_CHECKPOINTS, mine, target)
            finally:
                await _release(conn, [_lock_key(key) for key in previous])
        previous_shards = {parse_checkpoint_key(key)[1] for key in previous}
        await _delete_consumers(self._js, self._stream, self._prefix, [name], previous_shards)
        log.info("projection %s now runs %s from seq %d (was %s)", name, _describe(mine), target, _describe(previous))
        return target

    async def _next_batch(self, puller: Puller, stopped: asyncio.Future[None]) -> list[Msg] | None:
        """The next batch ([] when none came within ``idle_wait``), or None once stopped."""
        if stopped.done():
            return None
        fetch = asyncio.ensure_future(puller.fetch(self._batch_size, self._idle_wait))
        await asyncio.wait((fetch, stopped), return_when=asyncio.FIRST_COMPLETED)
        if fetch.done():
            return fetch.result()
        fetch.cancel()
        with suppress(asyncio.CancelledError):
            await fetch
        return None


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

    Meant to run while no projector runs these projections: it takes their writer locks, every
    shard's included, and raises :class:`ProjectionBusy` if another process holds one. A sharded
    projection is rebuilt unsharded: its shard rows are deleted (and their consumers) in the same
    transaction that empties its tables, so its checkpoint is then its own row, which shard projectors
    adopt when they start. The log is read once for all of them (one ephemeral consumer; each batch
    commits every projection and its checkpoint in one transaction), which is what makes rebuilding
    everything as fast as rebuilding one. An interrupted rebuild leaves consistent tables at their
    last committed checkpoint, from which a projector continues."""
    projections = select(names)
    chosen = [projection.name for projection in projections]
    js = nc.jetstream()
    await migrate(pool)
    started = time.monotonic()
    async with pool.acquire() as conn:
        async with _layout_locked(conn, chosen):
            keys = set(chosen) | set(await _checkpoint_rows(conn, chosen))
            if not await _lead(conn, keys):
                raise ProjectionBusy(
                    f"projection(s) {', '.join(chosen)} are running elsewhere; stop the projector(s) first"
                )
            async with conn.transaction():
                await conn.execute(f"TRUNCATE {', '.join(table for p in projections for table in p.tables)}")
                await conn.execute("DELETE FROM checkpoints WHERE projection = ANY($1::text[])", sorted(keys))
                await conn.execute(_SAVE_CHECKPOINTS, chosen, 0)
        shards = {parse_checkpoint_key(key)[1] for key in keys}
        await _delete_consumers(js, stream, consumer_prefix, chosen, shards)
        events, last_seq, skipped = await _fold_log(conn, nc, stream, projections, batch_size, progress)
    return RebuildReport(tuple(chosen), events, last_seq, time.monotonic() - started, skipped)


async def _fold_log(
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
    js = nc.jetstream()
    if target is None:
        target = await last_event_seq(js, stream)
    reader = f"rebuild-{new_id()}"
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            name=reader,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=AckPolicy.NONE,
            filter_subject=EVENTS_FILTER,
            inactive_threshold=60.0,
            mem_storage=True,
        ),
    )
    puller = Puller(nc, stream, reader)
    done = skipped = 0
    last_seq = after
    fetch: asyncio.Future[list[Msg]] | None = None
    try:
        if progress is not None:
            progress(0, info.num_pending)
        if target > after:
            fetch = asyncio.ensure_future(puller.fetch(batch_size, _REBUILD_WAIT_SECONDS))
        while fetch is not None:
            msgs = await fetch
            if not msgs:
                log.warning("the log ended at seq %d, before seq %d: were events deleted?", last_seq, target)
                break
            more = msgs[-1].metadata.sequence.stream < target
            fetch = asyncio.ensure_future(puller.fetch(batch_size, _REBUILD_WAIT_SECONDS)) if more else None
            msgs = [msg for msg in msgs if msg.metadata.sequence.stream <= target]  # the rest is a projector's
            if not msgs:
                break
            result = await commit_batch(conn, projections, msgs, shard)
            done, last_seq, skipped = done + len(msgs), result.last_seq, skipped + result.skipped
            if progress is not None:
                progress(done, max(info.num_pending, done))
    finally:
        if fetch is not None:  # a read-ahead still in flight when a commit failed
            fetch.cancel()
            with suppress(Exception, asyncio.CancelledError):
                await fetch
        await puller.close()
        with suppress(Exception):
            await js.delete_consumer(stream, reader)
    return done, last_seq, skipped


def progress_bar(label: str = "rebuild", *, out: TextIO | None = None, width: int = 30) -> Progress:
    """A one-line progress display for ``controlplane projections rebuild``, to pass as ``progress``.
    Redraws in place (``\\r``) at most ten times a second, on stderr so that stdout stays parseable."""
    return _ProgressBar(label, out or sys.stderr, width)


class _ProgressBar:
    def __init__(self, label: str, out: TextIO, width: int) -> None:
        self._label = label
        self._out = out
        self._width = width
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if not finished and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        filled = self._width if finished else self._width * done // max(total, 1)
        rate = done / max(now - self._started, 1e-9)
        self._out.write(
            f"\r{self._label} [{'#' * filled}{'.' * (self._width - filled)}] {done:,}/{total:,} events, {rate:,.0f}/s"
        )
        if finished:
            self._out.write("\n")
        self._out.flush()
