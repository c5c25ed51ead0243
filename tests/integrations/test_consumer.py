"""The integration consumer API against a real nats-server: at-least-once delivery, type filters,
retries, dead letters, restarts."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from controlplane.embedded import EmbeddedNats
from core.domain.commands import SYSTEM, CancelTask, RegisterWorker
from core.domain.events import TaskSubmitted, decode_event
from core.domain.ids import InvalidToken
from core.domain.subjects import aggregate_subject, parse_aggregate_subject
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME, JetStreamEventStore
from integrations.consumer import (
    H_DLQ_CONSUMER,
    H_DLQ_DELIVERIES,
    H_DLQ_ERROR,
    H_DLQ_SEQ,
    H_DLQ_SUBJECT,
    DeadLetter,
    Delivery,
    EventSubscription,
    SubscriptionError,
    provision_dead_letter_stream,
    retry_delay,
)
from tests.integrations.helpers import dead_letter_count, dead_lettered, dead_letters, submit, wait_for

pytestmark = pytest.mark.integration

FAST_RETRIES = {"retry_delay": 0.05, "max_retry_delay": 0.2}


class Recorder:
    """A handler that records what it saw and fails, as told, for some task ids."""

    def __init__(self, *, failing: frozenset[str] = frozenset(), refusing: frozenset[str] = frozenset()) -> None:
        self.failing = failing
        self.refusing = refusing
        self.attempts: Counter[str] = Counter()
        self.handled: list[tuple[str, str]] = []  # (task id, event type)
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        task_id = parse_aggregate_subject(delivery.subject).id
        self.attempts[task_id] += 1
        self.deliveries.append(delivery)
        if task_id in self.refusing:
            raise DeadLetter(f"{task_id} can never be synced")
        if task_id in self.failing:
            raise RuntimeError(f"cannot sync {task_id}")
        self.handled.append((task_id, type(delivery.event).__name__))


@pytest.fixture
async def running() -> AsyncIterator[list[tuple[EventSubscription, asyncio.Task[None]]]]:
    """Subscriptions started by a test, stopped (and their errors surfaced) at its end."""
    started: list[tuple[EventSubscription, asyncio.Task[None]]] = []
    yield started
    for subscription, task in started:
        subscription.stop()
        async with asyncio.timeout(10):
            await task


async def start(
    started: list[tuple[EventSubscription, asyncio.Task[None]]], subscription: EventSubscription, handler: Recorder
) -> None:
    await subscription.start()
    started.append((subscription, asyncio.create_task(subscription.run(handler))))


async def test_poison_event_is_dead_lettered_after_max_deliveries_and_the_consumer_keeps_going(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    recorder = Recorder(failing=frozenset({"poison"}))
    subscription = EventSubscription(nc, org, "sync", max_deliveries=3, **FAST_RETRIES)
    await start(running, subscription, recorder)
    await submit(handler, org, "before")
    poison_seq = await submit(handler, org, "poison")
    await submit(handler, org, "after")
    js = nc.jetstream()
    await wait_for(lambda: dead_lettered(js, subscription.dead_letter_subject))
    await submit(handler, org, "later")
    await wait_for(lambda: ("later", "TaskSubmitted") in recorder.handled)

    assert recorder.attempts["poison"] == 3
    assert [task for task, _ in recorder.handled] == ["before", "after", "later"]
    [letter] = await dead_letters(js, subscription.dead_letter_subject)
    original = decode_event(letter.data)
    assert isinstance(original, TaskSubmitted)
    assert original.task_id == "poison"
    headers = letter.headers or {}
    assert headers[H_DLQ_DELIVERIES] == "3"
    assert headers[H_DLQ_SEQ] == str(poison_seq)
    assert headers[H_DLQ_SUBJECT] == aggregate_subject(org, "task", "poison")
    assert headers[H_DLQ_CONSUMER] == subscription.consumer
    assert headers[H_DLQ_ERROR] == "RuntimeError: cannot sync poison"
    assert headers["Cp-Actor"] == SYSTEM.id  # the original headers travel with it
    assert "Nats-Expected-Last-Subject-Sequence" not in headers
    info = await js.consumer_info(STREAM_NAME, subscription.consumer)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_handler_refusal_dead_letters_at_once(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    recorder = Recorder(refusing=frozenset({"refused"}))
    subscription = EventSubscription(nc, org, "sync", max_deliveries=5, **FAST_RETRIES)
    await start(running, subscription, recorder)
    await submit(handler, org, "refused")
    await submit(handler, org, "fine")
    await wait_for(lambda: ("fine", "TaskSubmitted") in recorder.handled)
    js = nc.jetstream()
    await wait_for(lambda: dead_lettered(js, subscription.dead_letter_subject))
    [letter] = await dead_letters(js, subscription.dead_letter_subject)
    assert recorder.attempts["refused"] == 1
    assert (letter.headers or {})[H_DLQ_DELIVERIES] == "1"
    assert (letter.headers or {})[H_DLQ_ERROR] == "refused can never be synced"


async def test_unreadable_payloads_are_dead_lettered_without_reaching_the_handler(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    recorder = Recorder()
    subscription = EventSubscription(nc, org, "sync", **FAST_RETRIES)
    await start(running, subscription, recorder)
    js = nc.jetstream()
    await js.publish(aggregate_subject(org, "task", "junk"), b"not json")
    future_version = b'{"type":"TaskSubmitted","v":99,"at":"2026-01-01T00:00:00Z"}'
    await js.publish(aggregate_subject(org, "task", "future"), future_version)
    await submit(handler, org, "fine")
    await wait_for(lambda: recorder.handled == [("fine", "TaskSubmitted")])
    await wait_for(lambda: dead_lettered(js, subscription.dead_letter_subject, 2))
    letters = await dead_letters(js, subscription.dead_letter_subject)
    errors = [(letter.headers or {})[H_DLQ_ERROR] for letter in letters]
    assert errors[0] == "not an event: the payload is not JSON with a type tag"
    assert errors[1].startswith("unreadable TaskSubmitted event: TaskSubmitted v99 is newer than this code")
    assert set(recorder.attempts) == {"fine"}


async def test_type_filter_hands_over_only_those_types_and_acknowledges_the_rest(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    recorder = Recorder()
    subscription = EventSubscription(nc, org, "cancellations", types={"TaskCancelled"}, **FAST_RETRIES)
    await start(running, subscription, recorder)
    await submit(handler, org, "t1")
    await submit(handler, org, "t2")
    await handler.handle(org, CancelTask(task_id="t2", reason="not needed"), actor=SYSTEM)
    await wait_for(lambda: recorder.handled == [("t2", "TaskCancelled")])
    js = nc.jetstream()

    async def all_settled() -> bool:
        info = await js.consumer_info(STREAM_NAME, subscription.consumer)
        return (info.num_pending, info.num_ack_pending, info.delivered.stream_seq) == (0, 0, info.ack_floor.stream_seq)

    await wait_for(all_settled)
    assert recorder.handled == [("t2", "TaskCancelled")]


async def test_a_restart_resumes_after_the_last_acknowledged_event_and_sees_only_its_org(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    other_org = f"{org}-other"
    first = Recorder()
    subscription = EventSubscription(nc, org, "sync", **FAST_RETRIES)
    task = asyncio.create_task(subscription.run(first))
    await submit(handler, org, "t1")
    await submit(handler, other_org, "elsewhere")
    await submit(handler, org, "t2")
    await wait_for(lambda: len(first.handled) == 2)
    subscription.stop()
    await asyncio.wait_for(task, 10)

    await submit(handler, org, "t3")
    second = Recorder()
    await start(running, EventSubscription(nc, org, "sync", **FAST_RETRIES), second)
    await wait_for(lambda: len(second.handled) == 1)
    await asyncio.sleep(0.2)  # room for a wrong redelivery to show up
    assert [task for task, _ in first.handled] == ["t1", "t2"]
    assert [task for task, _ in second.handled] == ["t3"]
    assert all(delivery.delivery_count == 1 for delivery in first.deliveries + second.deliveries)


async def test_a_new_subscription_can_start_from_now(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    await submit(handler, org, "old")
    recorder = Recorder()
    subscription = EventSubscription(nc, org, "fresh", start_from="now", **FAST_RETRIES)
    await subscription.start()
    await start(running, subscription, recorder)
    await submit(handler, org, "new")
    await wait_for(lambda: len(recorder.handled) == 1)
    assert recorder.handled == [("new", "TaskSubmitted")]


async def test_an_event_is_kept_until_its_dead_letter_is_stored(tmp_path: Path) -> None:
    """With no dead-letter stream, the poison event is retried, never dropped; once the stream exists
    it is dead-lettered exactly once."""
    with EmbeddedNats(tmp_path / "nats") as server:
        store = await JetStreamEventStore.connect(server.url)
        handler = CommandHandler(store)
        nc = await nats.connect(server.url)
        recorder = Recorder(failing=frozenset({"poison"}))
        subscription = EventSubscription(
            nc, "acme", "sync", max_deliveries=1, ensure_dead_letter_stream=False, **FAST_RETRIES
        )
        task = asyncio.create_task(subscription.run(recorder))
        try:
            js = nc.jetstream()
            poison_seq = await submit(handler, "acme", "poison")
            await wait_for(lambda: len(recorder.deliveries) >= 1)
            await asyncio.sleep(0.5)  # several dead-letter publishes fail meanwhile
            info = await js.consumer_info(STREAM_NAME, subscription.consumer)
            assert info.ack_floor.stream_seq < poison_seq  # still owed to this integration
            assert info.num_redelivered >= 1
            await provision_dead_letter_stream(js)
            await wait_for(lambda: dead_lettered(js, subscription.dead_letter_subject))
            await asyncio.sleep(0.3)
            assert await dead_letter_count(js, subscription.dead_letter_subject) == 1
            [letter] = await dead_letters(js, subscription.dead_letter_subject)
            assert "dead-lettering it failed before" in (letter.headers or {})[H_DLQ_ERROR]
            assert recorder.attempts["poison"] == 1  # the handler had its one attempt; retries were the dead letter's
        finally:
            subscription.stop()
            await asyncio.wait_for(task, 10)
            await nc.close()
            await store.close()


async def test_bad_arguments_are_refused_with_a_clear_message(nc: NATS) -> None:
    with pytest.raises(ValueError, match=r"unknown event type\(s\) TaskExploded;"):
        EventSubscription(nc, "acme", "sync", types={"TaskSubmitted", "TaskExploded"})
    with pytest.raises(InvalidToken, match="invalid org"):
        EventSubscription(nc, "acme.>", "sync")
    with pytest.raises(InvalidToken, match="invalid integration name"):
        EventSubscription(nc, "acme", "my sync")
    with pytest.raises(ValueError, match="max_deliveries must be at least 1"):
        EventSubscription(nc, "acme", "sync", max_deliveries=0)
    with pytest.raises(ValueError, match="start_from"):
        EventSubscription(nc, "acme", "sync", start_from="yesterday")  # type: ignore[arg-type]


@given(
    count=st.integers(min_value=1, max_value=10_000),
    first=st.floats(min_value=0.001, max_value=60),
    cap=st.floats(min_value=60, max_value=3600),
)
def test_retry_delays_double_up_to_the_cap(count: int, first: float, cap: float) -> None:
    delay = retry_delay(count, first, cap)
    assert 0 <= delay <= cap
    assert retry_delay(count + 1, first, cap) == min(cap, delay * 2) or delay == cap


async def test_a_subscription_to_one_aggregate_type_is_sent_nothing_else_and_narrows_a_live_consumer_in_place(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    everything = Recorder()
    wide = EventSubscription(nc, org, "sync", **FAST_RETRIES)
    await start(running, wide, everything)
    await submit(handler, org, "before")
    await handler.handle(org, RegisterWorker(worker_id="w1"), actor=SYSTEM)
    await wait_for(lambda: {("before", "TaskSubmitted"), ("w1", "WorkerRegistered")} <= set(everything.handled))
    wide.stop()
    async with asyncio.timeout(10):
        await running.pop()[1]

    # The same integration, upgraded to follow tasks only: the consumer keeps its place.
    await handler.handle(org, RegisterWorker(worker_id="w2"), actor=SYSTEM)
    await submit(handler, org, "after")
    tasks_only = Recorder()
    narrow = EventSubscription(nc, org, "sync", aggregate="task", **FAST_RETRIES)
    await start(running, narrow, tasks_only)
    await handler.handle(org, RegisterWorker(worker_id="w3"), actor=SYSTEM)
    await submit(handler, org, "later")
    await wait_for(lambda: ("later", "TaskSubmitted") in tasks_only.handled)

    assert tasks_only.handled == [("after", "TaskSubmitted"), ("later", "TaskSubmitted")]
    js = nc.jetstream()
    assert (await js.consumer_info(STREAM_NAME, narrow.consumer)).config.filter_subject == f"cp.{org}.task.*"

    async def settled() -> bool:  # the last acknowledgement is on its way
        info = await js.consumer_info(STREAM_NAME, narrow.consumer)
        return (info.num_pending, info.num_ack_pending) == (0, 0)

    await wait_for(settled)


async def test_a_consumer_outside_the_org_is_not_taken_over(nc: NATS, org: str) -> None:
    subscription = EventSubscription(nc, org, "sync")
    await nc.jetstream().add_consumer(
        STREAM_NAME, name=subscription.consumer, durable_name=subscription.consumer, filter_subject="cp.>"
    )
    with pytest.raises(SubscriptionError, match=r"exists with filter 'cp.>', outside cp\..*\.>"):
        await subscription.start()


async def test_a_widened_subscription_moved_back_gets_the_events_stored_meanwhile_and_alone_it_misses_them(
    nc: NATS, handler: CommandHandler, org: str, running: list[tuple[EventSubscription, asyncio.Task[None]]]
) -> None:
    workers = f"cp.{org}.worker.*"
    recorder, moved = Recorder(), Recorder()
    watched = EventSubscription(nc, org, "watch", subjects=[workers], **FAST_RETRIES)
    again = EventSubscription(nc, org, "again", subjects=[workers], **FAST_RETRIES)
    await watched.start(from_seq=1)
    await again.start(from_seq=1)
    await start(running, watched, recorder)
    await start(running, again, moved)
    missed = await submit(handler, org, "missed")
    await handler.handle(org, RegisterWorker(worker_id="w1"), actor=SYSTEM)
    # Both delivered w1, stored after the task: both passed the task, which they did not follow.
    registered = ("w1", "WorkerRegistered")
    await wait_for(lambda: registered in recorder.handled and registered in moved.handled)
    await watched.follow([workers, f"cp.{org}.task.*"])
    await again.follow([workers, f"cp.{org}.task.*"], from_seq=missed)
    await submit(handler, org, "after")
    after = ("after", "TaskSubmitted")
    await wait_for(lambda: after in recorder.handled and after in moved.handled)
    assert [task for task, _ in recorder.handled] == ["w1", "after"], "widened alone: the task stored before is missed"
    assert [task for task, _ in moved.handled] == ["w1", "missed", "w1", "after"], "moved back: delivered from there"


async def test_a_subscription_is_never_pointed_outside_its_org(nc: NATS, org: str) -> None:
    with pytest.raises(ValueError, match="subjects must be one or more of the org's"):
        EventSubscription(nc, org, "sync", subjects=["cp.>"])
    with pytest.raises(ValueError, match="subjects must be one or more of the org's"):
        EventSubscription(nc, org, "sync", subjects=[])
