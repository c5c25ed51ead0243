"""Batched reads from a JetStream pull consumer: the log reader every follower of the log uses (the
projector, the claim index, the scheduler), beside the store's direct-get reads of one subject."""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class Puller:
    """Fetches batches from a pull consumer, one request per batch: ``no_wait`` with ``expires`` makes
    the server send what is there at once (or wait up to ``expires`` for the first event) and end the
    batch with a 404 status. A subscription callback collects the messages; nats-py's ``fetch`` awaits
    every message with a task and a timeout of its own, which costs more than folding it does."""

    def __init__(self, nc: NATS, stream: str, consumer: str, *, api_prefix: str = "$JS.API") -> None:
        """``api_prefix``: where this connection reaches the JetStream API (a confined integration user
        reaches it through its account's import, under another prefix)."""
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._subscription: Subscription | None = None
        self._batch: list[Msg] = []
        self._wanted = 0
        self._done: asyncio.Future[list[Msg]] | None = None

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """Up to ``batch`` messages; [] if none came within ``wait`` seconds."""
        if self._subscription is None:
            self._subscription = await self._nc.subscribe(self._inbox, cb=self._receive)
        self._batch, self._wanted = [], batch
        self._done = done = asyncio.get_running_loop().create_future()
        request = {"batch": batch, "no_wait": True, "expires": int(wait * 1e9)}
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        async with asyncio.timeout(wait + 5.0):  # the server always answers unless the connection broke
            return await done

    async def close(self) -> None:
        if self._subscription is not None:
            with suppress(Exception):
                await self._subscription.unsubscribe()

    async def _receive(self, msg: Msg) -> None:
        done = self._done
        if done is None or done.done():
            return  # left over from an abandoned request; the consumer is recreated before the next run
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._batch.append(msg)
            if len(self._batch) >= self._wanted:
                done.set_result(self._batch)
        elif status in ("404", "408"):  # nothing (more) to deliver / the request expired
            done.set_result(self._batch)
        elif status != "100":  # 100 is a heartbeat
            description = msg.headers.get("Description", "") if msg.headers else ""
            done.set_exception(RuntimeError(f"pull from {self._next} failed: {status} {description}"))
