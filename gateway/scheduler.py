"""The scheduler: turns each schedule's fires into runs. It runs in every gateway process (which has
the submit path: environments, the submit policy, the command handler).

Fires are durable timers: ``ScheduleFired`` lands in ``cp.<org>.schedulefire.<id>`` at the cron time,
stored in the log whether or not any gateway is up (ADR 0011). The scheduler follows those subjects on
one durable JetStream pull consumer (``cp_schedule_fires``, file-backed, shared by every gateway: each
fire is delivered to one of them) and acknowledges a fire only after its run is carried out. A gateway
that dies mid-run leaves the fire unacknowledged, and it is delivered again (after
``ACK_WAIT_SECONDS``) to whichever gateway is up, which finishes it: the run's record and its task have
ids derived from the schedule, its generation and the fire time, so nothing is recorded or submitted
twice.

A fire is run on the schedule as this process last saw it, without reading the log, when that copy
names the fire as due; otherwise the schedule is read first (another gateway may have run the
previous fire). Either way the log has the last word: recording the run is refused if the schedule
moved on meanwhile (paused, deleted, recreated, its run recorded), and then nothing is submitted.

Releases before ADR 0011 fired into the schedule's own subject and ran fires from a consumer named
``cp_scheduler``. A scheduler that finds that consumer arms every live schedule's next fire in the
new shape, then deletes it (``upgrade_legacy_fires``; retried until the read model can list them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from core.domain.events import ScheduleFired, UnknownEvent, decode_event
from core.domain.schedules import SCHEDULE_AGGREGATE, SCHEDULE_FIRES, FireNotDue, is_due, run_task_id
from core.domain.subjects import EVENTS_PREFIX, parse_aggregate_subject
from core.log.reader import Puller
from gateway.schedules import SCHEDULER_ACTOR, Transient, finish_run, run_fire
from gateway.services import Services

log = logging.getLogger(__name__)

CONSUMER = "cp_schedule_fires"
FIRE_SUBJECTS = f"{EVENTS_PREFIX}.*.{SCHEDULE_FIRES}.*"
LEGACY_CONSUMER = "cp_scheduler"
"""The consumer of releases whose fires landed on the schedule's own subject."""
UPGRADE_RETRY_SECONDS = 30.0
ACK_WAIT_SECONDS = 10.0
RETRY_SECONDS = 1.0
BATCH = 256
CONCURRENCY = 256
LATENESS_SAMPLES = 100_000


class Scheduler:
    def __init__(
        self,
        svc: Services,
        *,
        consumer: str = CONSUMER,
        concurrency: int = CONCURRENCY,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._svc = svc
        self._consumer = consumer
        self._slots = asyncio.Semaphore(concurrency)
        self._retry_seconds = retry_seconds
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._upgrade: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.runs = 0
        """Fires this process ran (and recorded)."""
        self.lateness: deque[float] = deque(maxlen=LATENESS_SAMPLES)
        """Seconds from each fire's cron time to its run being recorded, newest last."""

    async def start(self) -> None:
        js = self._svc.store.nc.jetstream()
        stream = self._svc.store.stream
        try:
            await js.consumer_info(stream, self._consumer)
        except NotFoundError:
            await js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=self._consumer,
                    # Everything: a consumer created after fires were stored still runs them (the
                    # state says which fires are still due; the rest are acknowledged at once).
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=ACK_WAIT_SECONDS,
                    max_deliver=-1,
                    max_ack_pending=20_000,
                    filter_subject=FIRE_SUBJECTS,
                ),
            )
        loop = asyncio.get_running_loop()
        self._upgrade = loop.create_task(self._upgrade_legacy_fires_until_done())
        self._loop = loop.create_task(self._follow())

    async def upgrade_legacy_fires(self) -> int | None:
        """If the consumer of fires on schedules' own subjects exists, arm every live schedule's next
        fire on its fire subject (a fire the old shape still holds then folds as nothing) and delete
        that consumer. Returns the timers armed, or None if the read model could not list the schedules
        (the consumer is kept: ask again later)."""
        js = self._svc.store.nc.jetstream()
        try:
            await js.consumer_info(self._svc.store.stream, LEGACY_CONSUMER)
        except NotFoundError:
            return 0
        try:
            schedules = await self._svc.read_model.live_schedules()
        except Exception as exc:
            log.warning("scheduler: cannot list schedules to move their fires (%s); retrying", exc)
            return None
        armed = 0
        for org, schedule_id in schedules:
            armed += len(await self._svc.handler.rearm(org, SCHEDULE_AGGREGATE, schedule_id, actor=SCHEDULER_ACTOR.id))
        with contextlib.suppress(NotFoundError):  # another gateway upgraded at the same time
            await js.delete_consumer(self._svc.store.stream, LEGACY_CONSUMER)
        log.info("scheduler: %d schedules' fires moved to their fire subjects (%d timers armed)", len(schedules), armed)
        return armed

    async def _upgrade_legacy_fires_until_done(self) -> None:
        while not self._stopping.is_set():
            try:
                if await self.upgrade_legacy_fires() is not None:
                    return
            except Exception:
                log.warning("scheduler: moving an older release's fires failed; retrying", exc_info=True)
            await asyncio.sleep(UPGRADE_RETRY_SECONDS)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop fetching; let the runs in flight finish (a run cut short is delivered again)."""
        self._stopping.set()
        for background in (self._upgrade, self._loop):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await background
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace)

    async def _follow(self) -> None:
        puller = Puller(self._svc.store.nc, self._svc.store.stream, self._consumer)
        try:
            while not self._stopping.is_set():
                try:
                    messages = await puller.fetch(BATCH, wait=1.0)
                except (TimeoutError, RuntimeError, OSError) as exc:
                    log.warning("scheduler: fetching fires failed (%s); retrying", exc)
                    await asyncio.sleep(self._retry_seconds)
                    continue
                except Exception:
                    log.exception("scheduler: fetching fires failed; retrying")
                    await asyncio.sleep(self._retry_seconds)
                    continue
                for message in messages:
                    await self._slots.acquire()
                    task = asyncio.get_running_loop().create_task(self._handle(message))
                    self._running.add(task)
                    task.add_done_callback(self._done)
        finally:
            await puller.close()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _handle(self, message: Msg) -> None:
        try:
            await self.process(message)
        except Exception as exc:
            if isinstance(exc, Transient):
                log.warning("scheduler: a run must wait (%s); retrying in %.1f s", exc, self._retry_seconds)
            else:
                log.exception("scheduler: running a fire failed; it will be delivered again")
            with contextlib.suppress(Exception):
                await message.nak(delay=self._retry_seconds)
            return
        with contextlib.suppress(Exception):  # unacknowledged, it comes again and is found done
            await message.ack()

    async def process(self, message: Msg) -> None:
        """Run the fire ``message`` carries if its schedule still waits for it, or finish the run an
        earlier attempt recorded for it; anything else is done."""
        try:  # the event alone: its sequence and headers play no part here
            event = decode_event(message.data)
        except UnknownEvent:
            return  # written by newer code; that code's gateways run it
        if not isinstance(event, ScheduleFired):
            return
        org, _, schedule_id = parse_aggregate_subject(message.subject)
        task_id = run_task_id(org, schedule_id, event.generation, event.at)
        state = self._svc.handler.cached_state(org, SCHEDULE_AGGREGATE, schedule_id)
        if not is_due(state, event.generation, event.at):  # this copy may be behind: ask the log
            state, _ = await self._svc.handler.load(org, SCHEDULE_AGGREGATE, schedule_id)
        if not is_due(state, event.generation, event.at):
            await finish_run(self._svc, org, schedule_id, task_id)
            return
        try:
            await run_fire(self._svc, org, state, event.at, generation=event.generation, task_id=task_id)
        except FireNotDue:
            return  # the schedule moved on between this process's copy and the log
        self.runs += 1
        self.lateness.append((self._svc.clock() - event.at).total_seconds())
