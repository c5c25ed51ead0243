"""How far the projections have folded the log, and waiting until one has folded a sequence
(read-your-writes): woken by ``pg_notify`` on one shared listening connection, polling meanwhile."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

import asyncpg

from projections.read.scope import Reads
from projections.schema import NOTIFY_CHANNEL
from projections.shards import effective_checkpoints, fetch_checkpoints, layout_of, parse_checkpoint_key

log = logging.getLogger(__name__)


def _shard_count(checkpoint_key: str) -> int | None:
    """How many shards the layout of a checkpoint row has; None for an unsharded projection's row."""
    _, shard = parse_checkpoint_key(checkpoint_key)
    return None if shard is None else shard.count


class CheckpointReads(Reads):
    """Holds a LISTEN connection once waited on; ``close`` releases it."""

    def __init__(self, pool: asyncpg.Pool, *, poll_interval: float = 0.5) -> None:
        """``poll_interval``: how often ``wait_for`` re-reads checkpoints when no notification came
        (the listening connection may be reconnecting)."""
        super().__init__(pool)
        self._poll_interval = poll_interval
        self._listener: asyncpg.Connection | None = None
        self._listen_lock = asyncio.Lock()
        self._seen: dict[str, int] = {}
        self._tick: asyncio.Future[None] | None = None

    async def close(self) -> None:
        if self._listener is not None:
            with suppress(Exception):
                await self._listener.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            await self._pool.release(self._listener)
            self._listener = None

    async def checkpoints(self) -> dict[str, int]:
        """Each projection's committed sequence; for one run by shards, the one every shard reached."""
        return effective_checkpoints(await fetch_checkpoints(self._pool))

    async def checkpoint(self, projection: str) -> int:
        """The projection's committed sequence (with shards, their minimum) as last notified, read
        from the table when unknown: cheap enough for every long-poll iteration."""
        await self._listen()
        if self._listener is None or not layout_of(self._seen, projection):
            self._seen = await fetch_checkpoints(self._pool)
        return min(layout_of(self._seen, projection).values(), default=0)

    async def wait_for(self, projection: str, seq: int, timeout: float) -> bool:  # noqa: ASYNC109 (False, not an error)
        """Wait until ``projection`` (every shard of it, when sharded) has committed stream sequence
        ``seq`` (read-your-writes); False on timeout. Woken by ``pg_notify`` on one shared listening
        connection, with a poll every ``poll_interval`` in case a notification was missed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._tick is None:
            self._tick = loop.create_future()
        while True:
            tick = self._tick
            if await self.checkpoint(projection) >= seq:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait((tick,), timeout=min(remaining, self._poll_interval))
            if not tick.done():
                self._seen = await fetch_checkpoints(self._pool)

    async def _listen(self) -> None:
        async with self._listen_lock:
            if self._listener is not None:
                if not self._listener.is_closed():
                    return
                await self._pool.release(self._listener)
                self._listener = None
            conn = await self._pool.acquire()
            try:
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            except (OSError, asyncpg.PostgresError):
                log.warning("cannot LISTEN on %s; waits fall back to polling", NOTIFY_CHANNEL, exc_info=True)
                await self._pool.release(conn)
                return
            self._listener = conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        keys, _, seq = payload.rpartition(":")
        with suppress(ValueError):
            for key in keys.split(","):
                self._note(key, int(seq))
        if self._tick is not None:
            tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
            tick.set_result(None)

    def _note(self, key: str, seq: int) -> None:
        """Take a notified checkpoint row. A row of another layout than the one known (the projection
        went from unsharded to shards, or changed its shard count) makes the known rows stale and says
        nothing of its sibling shards: forget the projection's rows, and the next read loads the new
        layout whole from the table (a layout's rows are always created together)."""
        projection, _ = parse_checkpoint_key(key)
        known = layout_of(self._seen, projection)
        if known and {_shard_count(other) for other in known} == {_shard_count(key)}:
            self._seen[key] = seq
            return
        for stale in [other for other in self._seen if parse_checkpoint_key(other)[0] == projection]:
            del self._seen[stale]
