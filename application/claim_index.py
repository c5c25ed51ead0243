"""Which tasks a worker may claim, answered from memory. Every gateway keeps the open (not terminal)
tasks of the log folded in memory: it starts from the read model's snapshot at the tasks projection's
checkpoint, then follows the log itself from there, and its own commands update it at once. A claim
asks it for candidates in claim order and wins one through the log's optimistic concurrency; a stale
candidate only costs a lost race.

Claimers that found nothing wait on their queue. When a task opens up, one waiter that may take it is
woken, chosen by the queue's strategy (``core.domain.queues``): ``fifo``, the one waiting longest;
``least_loaded``, the one whose worker holds the fewest leases (then the longest waiting);
``round_robin``, the next worker id after the one this queue woke last; ``random``. A claimer that
finds a task at once takes it whatever the strategy: a strategy only picks among those waiting."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JetStreamError

from application.open_tasks import OpenTasks, fits
from core.domain.events import UnknownEvent
from core.domain.records import RecordedEvent
from core.domain.subjects import EVENTS_PREFIX, parse_aggregate_subject
from core.domain.task import Task
from core.log.reader import Puller
from core.log.store import STREAM_NAME, recorded_from_message
from projections.read import ReadModel

log = logging.getLogger(__name__)
TASK_EVENTS = f"{EVENTS_PREFIX}.*.task.*"
FETCH_BATCH = 512
RESUBSCRIBE_SECONDS = 1.0

LeaseExpiredHook = Callable[[str, str, str, int], None]
"""``(org, worker id, task id, seq)``: a lease the worker held expired (the event at ``seq``)."""


class LogObserver(Protocol):
    """What the claim index hands the task events it follows, besides folding them itself (the
    gateway's operator metrics)."""

    def seed(self, org: str, task: Task, seq: int) -> None: ...

    def fold(self, recorded: RecordedEvent) -> None: ...


@dataclass(eq=False)
class Waiter:
    """A claimer that found nothing and waits on its queue."""

    worker_id: str | None
    capabilities: frozenset[str]
    workflows_only: bool
    strategy: str
    """Its queue's strategy, as the claimer found it when it began to wait."""
    arrived: int
    """Its place in the order of arrival: the lower, the longer it has waited."""
    woken: asyncio.Future[None]


def choose_waiter(
    strategy: str, eligible: Sequence[Waiter], *, load: Callable[[str], int], last_woken: str | None, rng: Random
) -> Waiter:
    """The waiter that gets a task that opened up, among ``eligible`` (in order of arrival, not empty).
    ``load`` counts the leases a worker holds; ``last_woken`` is the worker this queue woke last."""
    match strategy:
        case "least_loaded":
            return min(eligible, key=lambda waiter: (load(waiter.worker_id or ""), waiter.arrived))
        case "round_robin":
            ids = sorted({waiter.worker_id or "" for waiter in eligible})
            chosen = next((worker for worker in ids if last_woken is None or worker > last_woken), ids[0])
            return next(waiter for waiter in eligible if (waiter.worker_id or "") == chosen)
        case "random":
            return eligible[rng.randrange(len(eligible))]
    return eligible[0]


class TaskTail:
    """One org's task events that the index follows after ``start``, in log order, as they come: what
    an event stream serves live instead of reading the log a second time. A reader more than ``limit``
    events behind is cut off (``overflowed``): it reads the log itself from where it got."""

    def __init__(self, start: int, limit: int) -> None:
        self.start = start
        """The index's position when the tail began: the events up to it are in the log, not here."""
        self.overflowed = False
        self._limit = limit
        self._events: deque[RecordedEvent] = deque()
        self._arrived = asyncio.Event()

    def push(self, recorded: RecordedEvent) -> None:
        if self.overflowed:
            return
        if len(self._events) >= self._limit:
            self.overflowed = True
            self._events.clear()
        else:
            self._events.append(recorded)
        self._arrived.set()

    async def next(self, wait: float) -> list[RecordedEvent]:
        """The events that came since the last call; waits up to ``wait`` seconds for one ([] if none
        came, or once ``overflowed``)."""
        if not self._events and not self.overflowed:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._arrived.wait()
        events = list(self._events)
        self._events.clear()
        return events


class ClaimIndex:
    """``OpenTasks`` kept current: loaded from the read model, then following the log."""

    def __init__(
        self,
        nc: NATS,
        read_model: ReadModel,
        *,
        stream: str = STREAM_NAME,
        observer: LogObserver | None = None,
        on_lease_expired: LeaseExpiredHook | None = None,
        rng: Random | None = None,
    ) -> None:
        """``observer`` (the operator metrics) is seeded with the snapshot and then handed every task
        event this index follows, once each, in log order: one reading of the log serves both.
        ``on_lease_expired`` hears of every lease expiry it follows (the workers' circuit breakers)."""
        self._nc, self._read_model, self._stream = nc, read_model, stream
        self._observer = observer
        self.on_lease_expired = on_lease_expired
        self._open = OpenTasks()
        self.candidates = self._open.candidates
        """What a claim may take now: :meth:`OpenTasks.candidates` of the tasks this index keeps."""
        self._position = 0
        self._waiters: dict[tuple[str, str], list[Waiter]] = {}
        self._last_woken: dict[tuple[str, str], str] = {}
        self._arrivals = itertools.count()
        self._rng = rng or Random()
        self._follower: asyncio.Task[None] | None = None
        self.claims_in_flight: set[str] = set()
        """Tasks a claim of this process is trying right now: concurrent claimers try others first."""
        self._tails: dict[str, set[TaskTail]] = {}

    @property
    def position(self) -> int:
        """The last stream sequence folded from the log."""
        return self._position

    def __len__(self) -> int:
        return len(self._open)

    async def start(self) -> None:
        tasks, self._position = await self._read_model.open_tasks()
        for org, task, seq in tasks:
            self._open.put(org, task, seq)
            if self._observer is not None:
                self._observer.seed(org, task, seq)
        log.info("claim index: %d open tasks at seq %d; following the log", len(self._open), self._position)
        self._follower = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

    def tail(self, org: str, limit: int) -> TaskTail:
        """From now on, hand ``org``'s task events this index folds to a new tail, until ``untail``."""
        tail = TaskTail(self._position, limit)
        self._tails.setdefault(org, set()).add(tail)
        return tail

    def untail(self, org: str, tail: TaskTail) -> None:
        tails = self._tails.get(org)
        if tails is not None:
            tails.discard(tail)
            if not tails:
                del self._tails[org]

    def observe(self, subject: str, state: Any, seq: int) -> None:
        """A command of this process committed: claims here see it before the log comes round. Once
        the log has come round it knows as much or more (the task may even be closed since)."""
        if isinstance(state, Task) and seq > self._position:
            org = parse_aggregate_subject(subject).org
            if self._open.put(org, state, seq):
                self._wake(org, state)

    def in_flight(self, org: str, queue: str | None = None) -> int:
        return self._open.in_flight(org, queue)

    async def wait(
        self,
        org: str,
        queue: str,
        seconds: float,
        *,
        worker_id: str | None = None,
        capabilities: Collection[str] = (),
        workflows_only: bool = False,
        strategy: str = "fifo",
    ) -> None:
        """Until a task on ``org``/``queue`` that this claimer may take opened up and the queue's
        ``strategy`` chose it, or ``seconds``."""
        key = (org, queue)
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(worker_id, frozenset(capabilities), workflows_only, strategy, next(self._arrivals), woken)
        self._waiters.setdefault(key, []).append(waiter)
        try:
            await asyncio.wait((woken,), timeout=seconds)
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiters[key]

    def waiting(self, org: str, queue: str) -> int:
        """Claimers waiting on the queue now."""
        return len(self._waiters.get((org, queue), ()))

    def _wake(self, org: str, task: Task) -> None:
        key = (org, task.queue)
        eligible = [
            waiter
            for waiter in self._waiters.get(key, ())
            if fits(task, waiter.capabilities, workflows_only=waiter.workflows_only, worker_id=waiter.worker_id)
        ]
        if not eligible:
            return
        chosen = choose_waiter(
            self._waiters[key][-1].strategy,  # the newest waiter read the queue's settings last
            eligible,
            load=lambda worker_id: self._open.leases_held(org, worker_id),
            last_woken=self._last_woken.get(key),
            rng=self._rng,
        )
        self._waiters[key].remove(chosen)
        if not self._waiters[key]:
            del self._waiters[key]
        if chosen.worker_id is not None:
            self._last_woken[key] = chosen.worker_id
        chosen.woken.set_result(None)

    async def _follow(self) -> None:
        """Fold every task event after ``position``; after a connection problem, carry on from there."""
        js = self._nc.jetstream()
        while True:
            try:
                consumer = await js.add_consumer(
                    self._stream,
                    ConsumerConfig(
                        filter_subject=TASK_EVENTS,
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=self._position + 1,
                        ack_policy=AckPolicy.NONE,
                        inactive_threshold=60.0,
                        mem_storage=True,
                    ),
                )
                puller = Puller(self._nc, self._stream, consumer.name)
                try:
                    while True:
                        for msg in await puller.fetch(FETCH_BATCH, 1.0):
                            self._fold(msg)
                finally:
                    await puller.close()
                    with contextlib.suppress(Exception):
                        await js.delete_consumer(self._stream, consumer.name)
            except (NatsError, JetStreamError, OSError, RuntimeError) as exc:
                log.warning("claim index: following the log failed (%r); again in %.0f s", exc, RESUBSCRIBE_SECONDS)
                await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _fold(self, msg: Msg) -> None:
        self._position = msg.metadata.sequence.stream
        try:
            recorded = recorded_from_message(msg)
        except (UnknownEvent, msgspec.DecodeError):  # the projector reports it; a claim cannot use it
            log.warning("claim index: cannot read the event at seq %d on %s", self._position, msg.subject)
            return
        if self._tails and (tails := self._tails.get(parse_aggregate_subject(recorded.subject).org)):
            for tail in tails:
                tail.push(recorded)
        if self._observer is not None:
            try:
                self._observer.fold(recorded)
            except Exception:  # a metrics bug must never stop claims from seeing the log
                log.exception("claim index: the observer failed on the event at seq %d", self._position)
        expired = self._open.lease_expired(recorded)
        if expired is not None and self.on_lease_expired is not None:
            try:
                self.on_lease_expired(*expired, recorded.seq)
            except Exception:
                log.exception("claim index: the lease-expiry hook failed on the event at seq %d", self._position)
        opened = self._open.fold(recorded)
        if opened is not None:
            self._wake(*opened)
