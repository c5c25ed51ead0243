"""The log reader: the two ways a process reads the stream, with the server's status replies read in
one place.

* :class:`LogReader` reads a subject, or a filter such as ``cp.<org>.>``, from a sequence or a time by
  batched direct get. No consumer is created on the server, so a read leaves nothing behind: the event
  store reads aggregates this way, the replay and audit tools whole orgs.
* :class:`Puller` fetches batches from a pull consumer: a durable one (the projector, the scheduler,
  integrations, the claim index) or one of its own that it removes when closed (SSE feeds, rebuilds).

Both hand out nats-py messages; ``core.log.store.recorded_from_message`` makes records of them.

What the server answers. A batched direct get sends the matching messages, each with the stream's
``Nats-Sequence``, ``Nats-Subject`` and ``Nats-Time-Stamp`` among its headers, then ``204 EOB``, whose
``Nats-Num-Pending`` counts the matching messages after the batch (the next request continues after the
last one received); ``404`` when nothing matches from the start on; ``408`` when it cannot read the
request. A standing pull request ends when its batch is delivered, or with ``408`` (its ``expires``
passed; ``404`` ends a ``no_wait`` one); ``100`` is a heartbeat; ``409`` (consumer deleted, leadership
changed, …) and anything else fail it. Either way, a request to a stream or consumer nobody serves is
answered ``503`` by nats-server (no responders).

Headers are parsed by nats-py's own parser: byte-level
since 2.16, so non-ASCII values arrive decoded and nothing is lost. A hand-written one is about three
times faster on a direct-get reply's ten headers (~3 µs instead of ~10 µs), but it can only be swapped
in by overriding a private method of nats-py's client, which this module does not do."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, suppress
from datetime import datetime
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from core.domain.records import rfc3339
from core.log.event_store import StoreError

READ_BATCH = 512
"""Messages per direct-get request, unless a read asks for another number."""
READ_TIMEOUT_SECONDS = 5.0
"""How long a direct get may go without a reply (messages of a batch reset it)."""
PULL_REQUEST_SECONDS = 30.0
"""How long a standing pull request lasts (the server then ends it with a 408 and the next fetch asks again)."""
PULL_REQUEST_GRACE_SECONDS = 5.0
"""How long after its expiry a request whose end never came (a reconnect lost it) is still counted on."""
FEED_INACTIVE_SECONDS = 60.0
"""How long the server keeps a consumer of :meth:`Puller.ephemeral` that nobody asks for."""

STATUS = "Status"
DESCRIPTION = "Description"
NUM_PENDING = "Nats-Num-Pending"

Progress = Callable[[int, int], None]
"""``progress(done, total)``: how far a long read, or a fold of it, has come."""


def status_of(msg: Msg) -> str | None:
    """The status of a reply from the server (``"204"``, ``"404"``, …), None for a stored message."""
    return msg.headers.get(STATUS) if msg.headers else None


def _failure(msg: Msg, what: str) -> str:
    status = status_of(msg)
    if status == "503":
        return f"{what}: nothing answers there (no such stream or consumer)"
    description = (msg.headers or {}).get(DESCRIPTION, "")
    return f"{what} failed: {status} {description}".rstrip()


class _PullRequest:
    """A standing pull request: how many messages it may still deliver, and when to stop counting on it."""

    __slots__ = ("forgotten_at", "remaining")

    def __init__(self, remaining: int, forgotten_at: float) -> None:
        self.remaining = remaining
        self.forgotten_at = forgotten_at


class _Request:
    """A direct-get batch in flight: what arrived so far, and ``done`` with the count of matching
    messages after it once the server ends the batch."""

    __slots__ = ("done", "messages", "watchdog", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.messages: list[Msg] = []
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.watchdog: asyncio.TimerHandle | None = None


class LogReader:
    """Reads the stream by batched direct get: one request per batch, the next one sent as soon as
    the current one ends, before its messages are handed out. Replies come to one long-lived
    subscription and are told apart by the last token of their inbox (a subscription per read would
    cost a subscribe and an unsubscribe on each)."""

    def __init__(self, nc: NATS, stream: str, *, timeout: float = READ_TIMEOUT_SECONDS) -> None:
        self._nc = nc
        self.stream = stream
        self._direct_get = f"$JS.API.DIRECT.GET.{stream}"
        self._timeout = timeout
        self._inbox = nc.new_inbox()
        self._subscription: Subscription | None = None
        self._requests: dict[str, _Request] = {}
        self._tokens = itertools.count()

    async def read(self, subject_filter: str, *, after_seq: int = 0) -> list[Msg]:
        """Every message under ``subject_filter`` after ``after_seq``, in stream order."""
        messages: list[Msg] = []
        async with aclosing(self.batches(subject_filter, start_seq=after_seq + 1)) as batches:
            async for batch in batches:
                messages += batch
        return messages

    async def batches(
        self,
        subject_filter: str,
        *,
        start_seq: int = 1,
        start_time: datetime | None = None,
        batch: int = READ_BATCH,
        progress: Progress | None = None,
    ) -> AsyncIterator[list[Msg]]:
        """The messages under ``subject_filter`` from ``start_seq`` (or those stored at or after
        ``start_time``), in stream order, in batches of up to ``batch``. ``progress(read, read +
        pending)`` is told after each batch. Close the iterator (``aclosing``) when leaving it early."""
        first: dict[str, Any] = {"start_time": rfc3339(start_time)} if start_time is not None else {"seq": start_seq}
        ahead: str | None = await self._ask(first, subject_filter, batch)
        read = 0
        try:
            while ahead is not None:
                request = self._requests[ahead]
                remaining = await self._ended(request)
                del self._requests[ahead]
                ahead = None
                if request.messages and remaining > 0:
                    last_seq = int(request.messages[-1].headers["Nats-Sequence"])  # type: ignore[index]
                    ahead = await self._ask({"seq": last_seq + 1}, subject_filter, batch)
                read += len(request.messages)
                if progress is not None:
                    progress(read, read + remaining)
                if request.messages:
                    yield request.messages
        finally:
            if ahead is not None:  # left early: the batch asked for ahead is nobody's
                self._requests.pop(ahead).done.cancel()

    async def last(self, subject_filter: str) -> Msg | None:
        """The newest message under ``subject_filter``; None when there is none."""
        request = msgspec.json.encode({"last_by_subj": subject_filter})
        what = f"reading the last message of {subject_filter}"
        try:
            reply = await self._nc.request(self._direct_get, request, timeout=self._timeout)
        except NatsTimeoutError as exc:
            raise StoreError(f"{what} timed out") from exc
        except NoRespondersError as exc:
            raise StoreError(f"{what}: nothing answers there (no stream {self.stream})") from exc
        status = status_of(reply)
        if status == "404":
            return None
        if status is not None:
            raise StoreError(_failure(reply, what))
        return reply

    async def close(self) -> None:
        if self._subscription is not None:
            with suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _ask(self, where: dict[str, Any], subject_filter: str, batch: int) -> str:
        if self._subscription is None:
            self._subscription = await self._nc.subscribe(f"{self._inbox}.*", cb=self._receive)
        token = str(next(self._tokens))
        self._requests[token] = _Request(f"reading {subject_filter}")
        body = msgspec.json.encode({**where, "next_by_subj": subject_filter, "batch": batch})
        try:
            await self._nc.publish(self._direct_get, body, reply=f"{self._inbox}.{token}")
        except BaseException:
            del self._requests[token]
            raise
        return token

    async def _ended(self, request: _Request) -> int:
        """Wait for the server to end the batch; fail once it stays silent for the timeout. A timer
        handle watches instead of ``asyncio.wait``, which costs several times more per read."""
        request.watchdog = asyncio.get_running_loop().call_later(
            self._timeout, self._watch, request, len(request.messages)
        )
        try:
            return await request.done
        finally:
            request.done.cancel()  # a no-op once it is done
            if request.watchdog is not None:
                request.watchdog.cancel()

    def _watch(self, request: _Request, received_before: int) -> None:
        """A timeout after the last look: fail ``request`` if nothing arrived since, else look again
        after another."""
        received = len(request.messages)
        if received > received_before:
            request.watchdog = asyncio.get_running_loop().call_later(self._timeout, self._watch, request, received)
        elif not request.done.done():
            request.done.set_exception(StoreError(f"{request.what} from the log timed out"))

    async def _receive(self, msg: Msg) -> None:
        request = self._requests.get(msg.subject.rpartition(".")[2])
        if request is None or request.done.done():
            return  # its read gave up (timed out, failed, or left early) meanwhile
        status = status_of(msg)
        if status is None:
            request.messages.append(msg)
        elif status == "204":  # end of the batch: how many match after it
            request.done.set_result(int(msg.headers.get(NUM_PENDING, "0")))  # type: ignore[union-attr]
        elif status == "404":  # nothing (more) matches
            request.done.set_result(0)
        else:
            request.done.set_exception(StoreError(_failure(msg, request.what)))


class Puller:
    """Reads a pull consumer through standing requests: a request without ``no_wait`` asks the server
    to push up to ``batch`` messages as they are stored, for up to :data:`PULL_REQUEST_SECONDS`, into
    this puller's inbox. :meth:`fetch` hands out what has arrived and asks for more once fewer than a
    batch are still asked for, so a steady follower costs one request per half batch of messages, not a
    request and an end-of-batch status per fetch (with events coming one or two at a time, that was two
    of every three messages the server exchanged with a follower). A subscription callback collects the
    messages; nats-py's ``fetch`` awaits every message with a task and a timeout of its own, which costs
    more than folding it does.

    Messages are delivered (for an acknowledging consumer, their ``ack_wait`` runs) when they reach the
    buffer, at most two batches ahead of the caller. The server serves a consumer's requests in the
    order they came, so each delivery counts against the oldest open request; a request ends when its
    batch is delivered, with a ``408`` when it expires, and is forgotten here a little after it should
    have expired, should that status never come (a reconnect)."""

    def __init__(
        self, nc: NATS, stream: str, consumer: str, *, api_prefix: str = "$JS.API", owns_consumer: bool = False
    ) -> None:
        """``api_prefix``: where this connection reaches the JetStream API (a confined integration user
        reaches it through its account's import, under another prefix). ``owns_consumer``: :meth:`close`
        deletes the consumer too."""
        self._nc = nc
        self.stream = stream
        self.consumer = consumer
        self._owns_consumer = owns_consumer
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._subscription: Subscription | None = None
        self._buffer: deque[Msg] = deque()
        self._open: deque[_PullRequest] = deque()
        self._arrived = asyncio.Event()
        self._failure: str | None = None
        self.pending = 0
        """Messages the consumer had to deliver when :meth:`ephemeral` made it."""

    @classmethod
    async def ephemeral(
        cls,
        nc: NATS,
        stream: str,
        subject_filter: str,
        *,
        start_seq: int = 1,
        name: str | None = None,
        inactive_threshold: float = FEED_INACTIVE_SECONDS,
    ) -> Puller:
        """A puller on a consumer of its own: the messages under ``subject_filter`` from ``start_seq``
        on, never acknowledged, kept in memory, deleted by :meth:`close` (or by the server once nobody
        has asked for ``inactive_threshold`` seconds, should ``close`` not get to)."""
        config = ConsumerConfig(
            name=name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.NONE,
            filter_subject=subject_filter,
            inactive_threshold=inactive_threshold,
            mem_storage=True,
        )
        info = await nc.jetstream().add_consumer(stream, config)
        puller = cls(nc, stream, info.name, owns_consumer=True)
        puller.pending = info.num_pending or 0
        return puller

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """Up to ``batch`` messages, as soon as at least one has arrived; [] if none came within ``wait``
        seconds. Raises ``RuntimeError`` when the server ended a request with a failure (the consumer
        was deleted, its leader changed, …)."""
        if self._subscription is None:
            self._subscription = await self._nc.subscribe(self._inbox, cb=self._receive)
        self._raise_failure()
        now = time.monotonic()
        while self._open and self._open[0].forgotten_at <= now:
            self._open.popleft()
        if sum(request.remaining for request in self._open) < batch:
            self._open.append(_PullRequest(batch, now + PULL_REQUEST_SECONDS + PULL_REQUEST_GRACE_SECONDS))
            request = {"batch": batch, "expires": int(PULL_REQUEST_SECONDS * 1e9)}
            await self._nc.publish(self._next, msgspec.json.encode(request), reply=self._inbox)
        if not self._buffer:
            self._arrived.clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._arrived.wait()
                await asyncio.sleep(0)  # messages of the same read are handed to the callback one by one
            self._raise_failure()
        return self.take(batch)

    def take(self, limit: int) -> list[Msg]:
        """Up to ``limit`` of the messages that have arrived, without asking the server for more (so it
        cannot fail): what a reader that waited a moment for more collects."""
        return [self._buffer.popleft() for _ in range(min(limit, len(self._buffer)))]

    async def close(self) -> None:
        """Stop reading. The server drops a standing request whose inbox nobody reads once it knows, so
        the unsubscription is flushed before this returns: an event stored after ``close`` is left for
        the next reader of the consumer, not sent here. Messages that arrived but were never handed out
        are given back to the consumer (a ``nak``) instead of waiting out their ``ack_wait``."""
        if self._subscription is not None:
            with suppress(Exception):
                await self._subscription.unsubscribe()
                # Shielded: nats-py's flush cancelled mid-way leaves a cancelled future for the PONG,
                # and the read loop then fails on it, losing what else that read brought (replies).
                await asyncio.shield(self._nc.flush())
        unread, self._buffer = list(self._buffer), deque()
        if self._owns_consumer:  # else the server removes it once it has been idle long enough
            with suppress(Exception):
                await self._nc.jetstream().delete_consumer(self.stream, self.consumer)
            return
        for msg in unread:
            with suppress(Exception):
                await msg.nak()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise RuntimeError(failure)

    async def _receive(self, msg: Msg) -> None:
        status = status_of(msg)
        if status is None:
            self._buffer.append(msg)
            if self._open:
                self._open[0].remaining -= 1
                if self._open[0].remaining <= 0:
                    self._open.popleft()
            self._arrived.set()
            return
        if status == "100":  # a heartbeat
            return
        if self._open:  # the server ended the oldest request: expired (408), or failed
            self._open.popleft()
        if status not in ("404", "408"):
            self._failure = _failure(msg, f"pull from {self._next}")
            self._arrived.set()
