"""A durable, at-least-once subscription to one org's events, for integration authors.

    subscription = EventSubscription(nc, "acme", "crm-sync", types={"TaskCompleted"}, max_deliveries=5)
    running = asyncio.create_task(subscription.run(handle))  # async def handle(delivery: Delivery) -> None
    ...
    subscription.stop()
    await running

Each subscription is a durable JetStream pull consumer ``<name>@<org>`` on ``CP_EVENTS``, filtered on
``cp.<org>.>`` (or, with ``aggregate``, on one aggregate type's subjects, ``cp.<org>.task.*``, or on
``subjects`` of the org's: the server then never sends the rest): timer definitions (``cpsched.``) are
never delivered, the events they fire are. A restart resumes after the last acknowledged event; one
with another filter within the org (a subscription narrowed or widened by an upgrade) changes the
consumer's filter in place and resumes too. ``follow`` changes the filter of a running subscription,
and can move it back to an earlier event (see there).

What the handler does decides what happens to the event:

* returns: acknowledged, never delivered again;
* raises ``DeadLetter``: dead-lettered now (retrying cannot help, e.g. the receiver refuses it);
* raises anything else: redelivered after a doubling delay; the ``max_deliveries``-th failure dead-letters it.

Events of types outside ``types`` are acknowledged without calling the handler, and payloads that are
not readable events are dead-lettered at once. A dead letter is published to ``cpdlq.<org>.<name>``
(stream ``CP_DEADLETTER``, kept 30 days) with the original payload (secrets redacted, below), the
original headers minus JetStream's ``Nats-*`` control headers, and ``Cp-Dlq-*`` headers saying where it
came from and why; only then is the original terminated, so the subscription moves on. If that
publish fails, the event is retried later instead: nothing is dropped. This is also why the
server-side ``max_deliver`` is unlimited and the limit is counted here.

Secrets: handlers get every event in its public form (``core.domain.public``): the fields its type declares
secret, such as an API key's hash, read ``"[redacted]"``. A dead letter's payload is redacted the same
way; any other payload is kept byte for byte. The redaction is this class's: a NATS user that fetches
from the consumer by other means reads the payloads as stored.

Order: events arrive in stream order, but one being retried comes back after its delay while later
events go on. Handlers must tolerate duplicates (a crash between handling and acknowledging
redelivers), e.g. by deduplicating on ``Delivery.seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from core.domain.events import EVENT_TYPES, AnyEvent, UnknownEvent, event_type_of
from core.domain.ids import validate_token
from core.domain.public import public_bytes, public_event
from core.domain.records import RecordedEvent
from core.domain.subjects import EVENTS_PREFIX, org_events_filter
from core.log.reader import Puller
from core.log.store import STREAM_NAME, recorded_from_message

log = logging.getLogger(__name__)

DEAD_LETTER_STREAM = "CP_DEADLETTER"
DEAD_LETTER_PREFIX = "cpdlq"
DEAD_LETTER_MAX_AGE_SECONDS = 30 * 24 * 3600.0

DEFAULT_JS_API_PREFIX = "$JS.API"
CONFINED_JS_API_PREFIX = "cpjs.API"
"""Where a confined integration account (``controlplane nats-config``) reaches the JetStream API of the
account holding CP_EVENTS: its imports are mapped under this prefix, because ``$JS.API`` in its own
account answers for its own (disabled) JetStream."""

H_DLQ_CONSUMER = "Cp-Dlq-Consumer"
H_DLQ_SEQ = "Cp-Dlq-Seq"
H_DLQ_SUBJECT = "Cp-Dlq-Subject"
H_DLQ_DELIVERIES = "Cp-Dlq-Deliveries"
H_DLQ_ERROR = "Cp-Dlq-Error"

FETCH_WAIT_SECONDS = 1.0
_MAX_ERROR_LENGTH = 1000
_STREAM_NAME_IN_USE = 10058


def consumer_name(org: str, name: str) -> str:
    """The JetStream consumer of integration ``name`` of ``org``. ``@`` occurs in neither token, so no
    two (org, name) pairs share a consumer: the per-org permissions rely on that."""
    return f"{validate_token(name, 'integration name')}@{validate_token(org, 'org')}"


def dead_letter_subject(org: str, name: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{validate_token(org, 'org')}.{validate_token(name, 'integration name')}"


def retry_delay(delivery_count: int, first: float, cap: float) -> float:
    """Seconds before redelivering an event whose ``delivery_count``-th delivery failed: doubling from
    ``first``, never more than ``cap``."""
    return min(cap, first * 2.0 ** min(max(delivery_count - 1, 0), 1023))


def filter_subjects_of(info: ConsumerInfo) -> tuple[str, ...]:
    """The subjects a consumer follows, whether it names one or several."""
    config = info.config
    return tuple(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


def check_event_types(types: Iterable[str]) -> frozenset[str]:
    checked = frozenset(types)
    if unknown := checked - EVENT_TYPES.keys():
        raise ValueError(f"unknown event type(s) {', '.join(sorted(unknown))}; known: {', '.join(EVENT_TYPES)}")
    if not checked:
        raise ValueError("name at least one event type, or none at all for every type")
    return checked


class DeadLetter(Exception):
    """Raised by a handler: this event can never be handled, so dead-letter it now instead of retrying."""


class SubscriptionError(Exception):
    """The subscription cannot be set up as asked; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Delivery:
    recorded: RecordedEvent
    headers: Mapping[str, str]
    delivery_count: int
    """1 on the first delivery, 2 on the first retry, and so on."""

    @property
    def event(self) -> AnyEvent:
        return self.recorded.event

    @property
    def seq(self) -> int:
        return self.recorded.seq

    @property
    def subject(self) -> str:
        return self.recorded.subject


Handler = Callable[[Delivery], Awaitable[None]]


async def provision_dead_letter_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create ``CP_DEADLETTER`` (subjects ``cpdlq.>``, file storage, 30 days) unless it exists; an existing
    stream keeps whatever retention its operator gave it."""
    config = StreamConfig(
        name=DEAD_LETTER_STREAM,
        subjects=[f"{DEAD_LETTER_PREFIX}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        max_age=DEAD_LETTER_MAX_AGE_SECONDS,
        num_replicas=replicas,
        duplicate_window=120.0,
    )
    try:
        await js.add_stream(config)
    except APIError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise


class EventSubscription:
    """One integration's durable subscription to one org's events (see the module docstring)."""

    def __init__(
        self,
        nc: NATS,
        org: str,
        name: str,
        *,
        types: Iterable[str] | None = None,
        max_deliveries: int = 5,
        ack_wait: float = 30.0,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        batch: int = 32,
        start_from: Literal["beginning", "now"] = "beginning",
        aggregate: str | None = None,
        subjects: Sequence[str] | None = None,
        js_api_prefix: str = DEFAULT_JS_API_PREFIX,
        ensure_dead_letter_stream: bool = True,
    ) -> None:
        """``start_from`` applies only when the consumer is created. ``aggregate`` keeps to the events of
        one aggregate type (e.g. ``"task"``); events of other types are not even delivered; ``subjects``
        (instead) names the org's subjects to follow, each ``cp.<org>.…``. ``js_api_prefix`` is
        ``CONFINED_JS_API_PREFIX`` for a user of a ``controlplane nats-config`` account, which may not
        create streams: there the operator provisions the dead-letter stream and
        ``ensure_dead_letter_stream`` must be False."""
        self.org = validate_token(org, "org")
        self.name = validate_token(name, "integration name")
        self.consumer = consumer_name(org, name)
        self.dead_letter_subject = dead_letter_subject(org, name)
        self.types = None if types is None else check_event_types(types)
        if subjects is not None and aggregate is not None:
            raise ValueError("give aggregate or subjects, not both")
        self.filter_subjects = (
            (org_events_filter(self.org, aggregate),) if subjects is None else self._within_org(subjects)
        )
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, not {max_deliveries}")
        if ack_wait <= 0 or retry_delay < 0 or max_retry_delay < retry_delay:
            raise ValueError("need ack_wait > 0 and 0 <= retry_delay <= max_retry_delay")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        if start_from not in ("beginning", "now"):
            raise ValueError(f"start_from must be 'beginning' or 'now', not {start_from!r}")
        self.max_deliveries = max_deliveries
        self.ack_wait = ack_wait
        self._first_retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._batch = batch
        self.start_from = start_from
        self._js_api_prefix = js_api_prefix
        self._ensure_dead_letter_stream = ensure_dead_letter_stream
        self._nc = nc
        self._js = nc.jetstream(prefix=js_api_prefix)
        self._pull: Puller | None = None
        self._stopping = asyncio.Event()

    def _within_org(self, subjects: Sequence[str]) -> tuple[str, ...]:
        prefix = f"{EVENTS_PREFIX}.{self.org}."
        chosen = tuple(subjects)
        if not chosen or any(not subject.startswith(prefix) or " " in subject for subject in chosen):
            raise ValueError(f"subjects must be one or more of the org's, each {prefix}…, not {list(chosen)!r}")
        return chosen

    async def consumer_info(self) -> ConsumerInfo | None:
        """The consumer as the server holds it, or None before it was ever created."""
        try:
            return await self._js.consumer_info(STREAM_NAME, self.consumer)
        except NotFoundError:
            return None

    async def start(self, *, from_seq: int | None = None) -> None:
        """Create the durable consumer (or update a live one's settings) and bind to it. A consumer
        created here starts as ``start_from`` says, or at stream sequence ``from_seq`` when given."""
        try:
            if self._ensure_dead_letter_stream:
                await provision_dead_letter_stream(self._js)
            existing = await self.consumer_info()
            if existing is not None:
                followed = filter_subjects_of(existing)
                if not followed or any(not s.startswith(f"{EVENTS_PREFIX}.{self.org}.") for s in followed):
                    shown = ", ".join(map(repr, followed)) or "none"
                    raise SubscriptionError(
                        f"consumer {self.consumer} exists with filter {shown}, outside "
                        f"{org_events_filter(self.org)}; delete it or choose another integration name"
                    )
                # Fixed at creation: a restart resumes where the consumer stopped.
                config = self._config(existing.config.deliver_policy, existing.config.opt_start_seq)
            elif from_seq is not None:
                config = self._config(DeliverPolicy.BY_START_SEQUENCE, from_seq)
            else:
                config = self._config(DeliverPolicy.ALL if self.start_from == "beginning" else DeliverPolicy.NEW)
            await self._js.add_consumer(STREAM_NAME, config)
        except APIError as exc:
            raise SubscriptionError(
                f"cannot set up consumer {self.consumer} on {STREAM_NAME}: {exc.description}"
            ) from exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise SubscriptionError(
                f"the JetStream API did not answer on {self._js_api_prefix} ({exc!r}): a confined integration user "
                f"needs the imports printed by `controlplane nats-config {self.org}` and the prefix "
                f"{CONFINED_JS_API_PREFIX}; any other user needs the account that holds {STREAM_NAME}"
            ) from exc
        self._pull = Puller(self._nc, STREAM_NAME, self.consumer, api_prefix=self._js_api_prefix)

    def _config(self, deliver_policy: DeliverPolicy | None, start_seq: int | None = None) -> ConsumerConfig:
        one = len(self.filter_subjects) == 1  # a confined integration account may only create these
        return ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            filter_subject=self.filter_subjects[0] if one else None,
            filter_subjects=None if one else list(self.filter_subjects),
            deliver_policy=deliver_policy,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
        )

    async def follow(self, subjects: Sequence[str], *, from_seq: int | None = None) -> None:
        """Follow ``subjects`` (the org's) from now on: the consumer's filter changes in place. The server
        does not go back for the events it already passed, so a wider filter alone misses those of the
        new subjects stored meanwhile: ``from_seq`` also moves the consumer to deliver every event of its
        filter from that stream sequence on, forgetting what it had delivered and not yet seen
        acknowledged (nats-server 2.14+, the consumer reset API; only a consumer that starts at the
        stream's first event or at a sequence, and not before that sequence). Raises
        ``SubscriptionError``."""
        self.filter_subjects = self._within_org(subjects)
        try:
            existing = await self.consumer_info()
            if existing is None:
                raise SubscriptionError(f"consumer {self.consumer} does not exist: start the subscription first")
            await self._js.add_consumer(
                STREAM_NAME, self._config(existing.config.deliver_policy, existing.config.opt_start_seq)
            )
            if from_seq is not None:
                reply = await self._nc.request(
                    f"{self._js_api_prefix}.CONSUMER.RESET.{STREAM_NAME}.{self.consumer}",
                    msgspec.json.encode({"seq": from_seq}),
                    timeout=5.0,
                )
                error = msgspec.json.decode(reply.data).get("error")
                if error:
                    raise SubscriptionError(
                        f"cannot move consumer {self.consumer} to event {from_seq}: {error.get('description')}"
                    )
        except APIError as exc:
            raise SubscriptionError(f"cannot change consumer {self.consumer}'s filter: {exc.description}") from exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise SubscriptionError(f"the JetStream API did not answer changing {self.consumer} ({exc!r})") from exc

    def stop(self) -> None:
        """Ask ``run`` to return once the event in hand is settled (within about FETCH_WAIT_SECONDS when
        idle); safe to call from a signal handler."""
        self._stopping.set()

    async def run(self, handler: Handler) -> None:
        """Hand each event to ``handler`` until ``stop()``; starts the subscription first if needed."""
        if self._pull is None:
            await self.start()
        assert self._pull is not None
        try:
            while not self._stopping.is_set():
                # Short waits rather than a cancelled long one: a cancelled fetch would leave its pull
                # request on the server, which would hand the next event to an inbox nobody reads.
                messages = await self._pull.fetch(self._batch, FETCH_WAIT_SECONDS)
                if messages:
                    await self._work_through(messages, handler)
        finally:
            pull, self._pull = self._pull, None
            await pull.close()

    async def _work_through(self, messages: list[Msg], handler: Handler) -> None:
        unsettled = list(messages)
        keeper = asyncio.create_task(self._keep_claimed(unsettled))
        try:
            for msg in messages:
                if self._stopping.is_set():
                    break
                await self._settle(msg, handler)
                unsettled.remove(msg)
        finally:
            keeper.cancel()
            # Hand back at once what this instance will not handle, instead of after ack_wait.
            for msg in unsettled:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()

    async def _keep_claimed(self, unsettled: list[Msg]) -> None:
        """While a batch is worked through, tell the server its remaining events are still in hand, so a
        slow handler does not get them redelivered meanwhile."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            for msg in list(unsettled):
                with contextlib.suppress(nats.errors.Error):  # disconnected: redelivery is the fallback
                    await msg.in_progress()

    async def _settle(self, msg: Msg, handler: Handler) -> None:
        count = msg.metadata.num_delivered
        try:
            event_type = event_type_of(msg.data)
        except msgspec.DecodeError:
            await self._dead_letter(msg, count, "not an event: the payload is not JSON with a type tag")
            return
        if self.types is not None and event_type not in self.types:
            await msg.ack()
            return
        if count > self.max_deliveries:
            await self._dead_letter(
                msg, count, f"delivered {count} times (max {self.max_deliveries}); dead-lettering it failed before"
            )
            return
        try:
            recorded = recorded_from_message(msg)
            recorded = msgspec.structs.replace(recorded, event=public_event(recorded.event))
        except (UnknownEvent, msgspec.DecodeError) as exc:
            await self._dead_letter(msg, count, f"unreadable {event_type} event: {exc}")
            return
        try:
            await handler(Delivery(recorded, dict(msg.headers or {}), count))
        except DeadLetter as exc:
            await self._dead_letter(msg, count, str(exc) or "refused by the handler")
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if count >= self.max_deliveries:
                await self._dead_letter(msg, count, error)
                return
            delay = retry_delay(count, self._first_retry_delay, self._max_retry_delay)
            log.warning(
                "%s: event %d failed on delivery %d of %d, retrying in %.2fs: %s",
                self.consumer,
                recorded.seq,
                count,
                self.max_deliveries,
                delay,
                error,
            )
            await msg.nak(delay=delay)
        else:
            await msg.ack()

    async def _dead_letter(self, msg: Msg, count: int, error: str) -> None:
        seq = msg.metadata.sequence.stream
        # JetStream's control headers (expected sequences, batch and schedule markers, msg id) would be
        # acted on again by the dead-letter stream.
        headers = {key: value for key, value in (msg.headers or {}).items() if not key.startswith("Nats-")}
        headers |= {
            "Nats-Msg-Id": f"{self.consumer}:{seq}",  # a repeated dead-letter publish is stored once
            H_DLQ_CONSUMER: self.consumer,
            H_DLQ_SEQ: str(seq),
            H_DLQ_SUBJECT: msg.subject,
            H_DLQ_DELIVERIES: str(count),
            H_DLQ_ERROR: " ".join(error.split())[:_MAX_ERROR_LENGTH],  # a header value is one line
        }
        try:
            await self._js.publish(self.dead_letter_subject, public_bytes(msg.data), headers=headers)
        except nats.errors.Error as exc:
            delay = retry_delay(count, self._first_retry_delay, self._max_retry_delay)
            log.error(
                "%s: could not dead-letter event %d to %s (%r); it stays in the log and is retried in %.2fs",
                self.consumer,
                seq,
                self.dead_letter_subject,
                exc,
                delay,
            )
            await msg.nak(delay=delay)
            return
        log.warning(
            "%s: event %d dead-lettered to %s after %d deliveries: %s",
            self.consumer,
            seq,
            self.dead_letter_subject,
            count,
            headers[H_DLQ_ERROR],
        )
        await msg.term()
