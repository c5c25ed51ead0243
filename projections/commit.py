"""The batch commit: one batch of the log folded into projections, in one PostgreSQL transaction
together with their checkpoints.

Exactly once. A batch, its rows and the checkpoints (stream sequence of its last message) commit
together, and messages at or below a projection's checkpoint are skipped, so applying a batch twice
(redelivered after a crash between commit and ack) changes nothing.

Bad data never stops a projection: a message that is no readable event is logged and skipped
(:func:`decode`), and an event whose data PostgreSQL refuses is found by bisecting the batch and
skipped alone (:func:`_apply_bisecting`). A projection whose code fails on an event (a bug) stops, with
the batch rolled back, until it is fixed."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from nats.aio.msg import Msg

from core.domain.records import RecordedEvent
from core.domain.subjects import parse_aggregate_subject
from core.log.store import recorded_from_message
from projections.folds.cache import BatchStates, StateCache
from projections.folds.projection import Projection
from projections.schema import NOTIFY_CHANNEL
from projections.shards import Shard, checkpoint_key

log = logging.getLogger(__name__)

POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)
"""Errors an event's own data causes (a value out of a column's range, …): retrying cannot help."""

_MOVE_CHECKPOINTS = """
    INSERT INTO checkpoints (projection, seq, updated_at) SELECT key, $2::bigint, now() FROM unnest($1::text[]) AS key
    {only}
    ON CONFLICT (projection) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at
    RETURNING projection
"""
_NOTIFY_MOVED = (
    f"SELECT pg_notify('{NOTIFY_CHANNEL}', string_agg(projection, ',') || ':' || $2::bigint) FROM moved"
    " HAVING count(*) > 0"
)
"""One notification per commit for all the checkpoint rows it moved (to one sequence), see
``projections.schema.NOTIFY_CHANNEL``."""
_SAVE_CHECKPOINTS = f"WITH moved AS ({_MOVE_CHECKPOINTS.format(only='')}) {_NOTIFY_MOVED}"
_START_BATCH = f"""
WITH previous AS MATERIALIZED (
    SELECT projection, seq FROM checkpoints WHERE projection = ANY($1::text[]) FOR UPDATE
), moved AS ({
    _MOVE_CHECKPOINTS.format(
        only="WHERE coalesce((SELECT p.seq FROM previous p WHERE p.projection = key), 0) < $2::bigint"
    )
})
SELECT set_config('cp.projector', 'on', true), set_config('synchronous_commit', 'off', true),
    ({_NOTIFY_MOVED}),
    (SELECT coalesce(array_agg(projection ORDER BY projection), '{{}}') FROM previous) AS projections,
    (SELECT coalesce(array_agg(seq ORDER BY projection), '{{}}') FROM previous) AS seqs
"""
"""A batch transaction's first statement, all in one round trip: its settings (``cp.projector`` lets
the writes through row-level security; asynchronous commit: a server crash may lose the last batches,
rows and checkpoints together, and they are folded again from the log, while waiting for the WAL flush
was most of a small batch's cost), the checkpoints as they were, locked, and those below the batch's
last sequence moved to it. Moved before the rows are written, but nobody sees either before the
commit, and they commit together or not at all."""


async def save_checkpoints(conn: asyncpg.Connection, keys: Sequence[str], seq: int) -> None:
    """Set the checkpoint rows ``keys`` to ``seq`` and tell the readers waiting for them."""
    await conn.execute(_SAVE_CHECKPOINTS, list(keys), seq)


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
    conn: asyncpg.Connection,
    projections: Sequence[Projection],
    msgs: Sequence[Msg],
    shard: Shard | None = None,
    cache: StateCache | None = None,
) -> BatchResult:
    """Fold one fetched batch into ``projections`` and move their checkpoints to its last sequence,
    all in one transaction. Messages at or below a projection's checkpoint were committed before (a
    crash between commit and ack) and are skipped, so applying a batch twice changes nothing. If
    PostgreSQL refuses some data, the transaction is rolled back and the batch applied again with each
    projection in a savepoint, see :func:`_apply_bisecting`.
    With a ``shard``, only its orgs' events are folded, and the checkpoints moved are the shard's rows.
    With a ``cache`` (the caller's, for as long as it leads these projections), the states the batch
    starts from are taken from it where the log proves them current, and the states it folded join it
    once committed (``projections.folds.cache``)."""
    owned = msgs if shard is None else owned_by(shard, msgs)
    recorded, undecodable = decode(owned)
    last_seq = msgs[-1].metadata.sequence.stream
    keys = {projection.name: checkpoint_key(projection.name, shard) for projection in projections}
    states = None if cache is None else cache.batch(owned)
    try:
        refused = await _commit(conn, projections, keys, recorded, last_seq, _apply_all(states))
    except POISON:  # rolled back: again, each projection in a savepoint, to find and skip what is refused
        # Without the cache: each piece must load what the pieces before it wrote. What the cache holds
        # stays older than what this commits, so no later event proves it current (see the cache).
        refused = await _commit(conn, projections, keys, recorded, last_seq, _apply_bisecting)
    else:
        if cache is not None and states is not None:
            cache.keep(states)
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
    """One transaction: the checkpoints below ``last_seq`` moved to it, and the events newer than each
    projection's checkpoint applied with ``apply``; returns what each projection that applied refused."""
    refused: dict[str, int] = {}
    async with conn.transaction():
        started = await conn.fetchrow(_START_BATCH, list(keys.values()), last_seq)
        checkpoints = dict(zip(started["projections"], started["seqs"], strict=True))
        for projection in projections:
            checkpoint = checkpoints.get(keys[projection.name], 0)
            if last_seq <= checkpoint:
                continue
            newer = [item for item in recorded if item.seq > checkpoint]
            refused[projection.name] = await apply(conn, projection, newer)
    return refused


def _apply_all(states: BatchStates | None) -> Apply:
    """The common case: PostgreSQL takes every row, and no savepoint per projection is paid for."""

    async def apply(conn: asyncpg.Connection, projection: Projection, events: list[RecordedEvent]) -> int:
        return await projection.apply(conn, events, states)

    return apply


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
