"""The event store and command handler against a real nats-server: concurrency, idempotency,
atomic batches and durable timers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest

from controlplane.embedded import EmbeddedNats
from core.domain.commands import (
    SYSTEM,
    Actor,
    CancelTask,
    ClaimTask,
    CompleteTask,
    DecideApproval,
    HeartbeatTask,
    RegisterWorker,
    RequestApproval,
    SubmitTask,
)
from core.domain.errors import InvalidTransition, Rejected
from core.domain.events import (
    ApprovalDecided,
    DecidingVote,
    TaskCancelled,
    TaskClaimed,
    TaskLeaseExpired,
)
from core.domain.ids import InvalidToken
from core.domain.subjects import aggregate_subject
from core.domain.task_decider import TASK
from core.log.event_store import AppendMeta, DuplicateAppend, EventTooLarge, WrongExpectedSequence
from core.log.handler import CommandHandler, timer_subject
from core.log.store import JetStreamEventStore

pytestmark = pytest.mark.integration

WORKER = Actor("worker-key", frozenset({"worker"}))
APPROVER = Actor("approver-key", frozenset({"approver"}))


async def submit(handler: CommandHandler, org: str, task_id: str = "t1", **fields: object) -> None:
    await handler.handle(org, SubmitTask(task_id=task_id, task_type="deploy", **fields), actor=SYSTEM)  # type: ignore[arg-type]


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await predicate():
            await asyncio.sleep(0.05)


@pytest.fixture
async def eight_handlers(nats_server: EmbeddedNats) -> AsyncIterator[list[CommandHandler]]:
    stores = [await JetStreamEventStore.connect(nats_server.url) for _ in range(8)]
    yield [CommandHandler(s) for s in stores]
    for s in stores:
        await s.close()


async def test_eight_concurrent_claimers_one_winner(
    handler: CommandHandler, eight_handlers: list[CommandHandler], org: str
) -> None:
    await submit(handler, org)
    for h in eight_handlers:  # every claimer has read the pending task before anyone claims
        await h.load(org, "task", "t1")

    async def claim(i: int, h: CommandHandler) -> str:
        try:
            await h.handle(org, ClaimTask(task_id="t1", worker_id=f"w{i}", lease_id=f"l{i}"), actor=WORKER)
        except InvalidTransition:
            return "lost"
        return "won"

    results = await asyncio.gather(*(claim(i, h) for i, h in enumerate(eight_handlers)))
    assert sorted(results) == ["lost"] * 7 + ["won"]
    history = await handler.history(org, "task", "t1")
    assert [type(r.event) for r in history].count(TaskClaimed) == 1


async def test_a_stale_writer_loses_the_race_and_decides_again(
    store: JetStreamEventStore, handler: CommandHandler, org: str
) -> None:
    await submit(handler, org)
    other = CommandHandler(store)
    await other.load(org, "task", "t1")
    await handler.handle(org, CancelTask(task_id="t1", reason="changed my mind"), actor=SYSTEM)
    with pytest.raises(Rejected, match="already cancelled"):
        await other.handle(org, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1"), actor=WORKER)


async def test_retried_command_returns_the_original_outcome_and_appends_nothing(
    store: JetStreamEventStore, handler: CommandHandler, org: str
) -> None:
    await submit(handler, org)
    claim = ClaimTask(task_id="t1", worker_id="w1", lease_id="l1")
    first = await handler.handle(org, claim, actor=WORKER, command_id="retry-me")
    last_seq = await store.last_seq()
    again = await handler.handle(org, claim, actor=WORKER, command_id="retry-me")
    cold = await CommandHandler(store).handle(org, claim, actor=WORKER, command_id="retry-me")
    assert again.duplicate
    assert cold.duplicate
    assert again.seq == cold.seq == first.seq
    assert cold.state == first.state
    # This org's subjects only: timers of other tests' aggregates fire on the shared stream meanwhile.
    assert await store.read_subject(f"cp.{org}.>", after_seq=first.seq - 1) != []  # the read sees the org's events
    assert await store.read_subject(f"cp.{org}.>", after_seq=last_seq) == []


async def test_a_deciding_vote_is_one_event_with_the_vote_in_it(handler: CommandHandler, org: str) -> None:
    """One message, not an atomic batch of two: a single-node file-backed stream stages a batch on disk."""
    await submit(handler, org)
    await handler.handle(org, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1"), actor=WORKER)
    await handler.handle(
        org,
        RequestApproval(task_id="t1", worker_id="w1", lease_id="l1", approval_id="a1", reason="prod"),
        actor=WORKER,
    )
    decided = await handler.handle(
        org, DecideApproval(task_id="t1", approval_id="a1", decision="approve", comment="ok"), actor=APPROVER
    )
    [recorded] = decided.events
    assert recorded.event == ApprovalDecided(
        at=recorded.event.at,
        approval_id="a1",
        outcome="approved",
        vote=DecidingVote(by=APPROVER.id, decision="approve", comment="ok"),
    )
    assert decided.state.status == "pending"
    [approval] = decided.state.approvals
    assert [(vote.by, vote.decision, vote.comment) for vote in approval.decisions] == [(APPROVER.id, "approve", "ok")]
    assert (await handler.history(org, "task", "t1"))[-1] == recorded


async def test_a_batch_with_a_wrong_expected_sequence_stores_nothing(store: JetStreamEventStore, org: str) -> None:
    subject = aggregate_subject(org, "task", "t1")
    now = datetime.now(UTC)
    events = [
        TaskCancelled(at=now, by="x", reason="one"),
        TaskCancelled(at=now, by="x", reason="two"),
    ]
    before = await store.last_seq()
    with pytest.raises(WrongExpectedSequence):
        await store.append(subject, events, expected_last_seq=7, meta=AppendMeta("c1", "x", now))
    assert await store.last_seq() == before
    assert await store.read_subject(subject) == []
    seqs = await store.append(subject, events, expected_last_seq=0, meta=AppendMeta("c2", "x", now))
    assert seqs == [before + 1, before + 2]
    with pytest.raises((DuplicateAppend, WrongExpectedSequence)):
        await store.append(subject, events, expected_last_seq=0, meta=AppendMeta("c2", "x", now))
    assert [r.seq for r in await store.read_subject(subject)] == seqs


async def test_unsafe_tokens_never_reach_a_subject(store: JetStreamEventStore, handler: CommandHandler) -> None:
    before = await store.last_seq()
    for org in ("acme.>", "acme *", "ACME", "", "a" * 64):
        with pytest.raises(InvalidToken):
            await submit(handler, org)
    assert await store.last_seq() == before


async def test_lease_timer_fires_after_the_server_restarts(
    nats_server: EmbeddedNats, handler: CommandHandler, org: str
) -> None:
    await submit(handler, org)
    await handler.handle(org, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=2), actor=WORKER)
    nats_server.restart()
    fresh = await JetStreamEventStore.connect(nats_server.url)
    try:
        reader = CommandHandler(fresh)

        async def returned_to_pending() -> bool:
            state, _ = await reader.load(org, "task", "t1")
            return state.status == "pending"

        await wait_for(returned_to_pending)
        history = await reader.history(org, "task", "t1")
        expired = [r for r in history if isinstance(r.event, TaskLeaseExpired)]
        assert len(expired) == 1
        assert expired[0].actor == "system:timer"
        assert expired[0].command_id is None
    finally:
        await fresh.close()


async def test_heartbeat_moves_the_lease_timer_and_completion_cancels_it(handler: CommandHandler, org: str) -> None:
    await submit(handler, org)
    await handler.handle(org, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=1), actor=WORKER)
    await asyncio.sleep(0.6)
    await handler.handle(org, HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=2), actor=WORKER)
    await asyncio.sleep(0.8)  # past the first expiry: the re-armed timer replaced it
    state, _ = await handler.load(org, "task", "t1")
    assert state.status == "running"
    await handler.handle(org, CompleteTask(task_id="t1", worker_id="w1", lease_id="l1", result=42), actor=WORKER)
    await asyncio.sleep(2.0)
    history = await handler.history(org, "task", "t1")
    assert not any(isinstance(r.event, TaskLeaseExpired) for r in history), "a cancelled timer never fires"


async def test_a_retired_timer_leaves_the_log(handler: CommandHandler, store: JetStreamEventStore, org: str) -> None:
    """The purge of a timer the new state no longer wants is sent without waiting for an answer: it
    must still take effect, and must not touch the timer that replaced it."""
    await submit(handler, org)
    claimed = await handler.handle(
        org, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=600), actor=WORKER
    )
    subject = aggregate_subject(org, "task", "t1")
    [first] = [timer_subject(subject, timer) for timer in TASK.timers(claimed.state)]
    beat = await handler.handle(
        org, HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=900), actor=WORKER
    )
    [second] = [timer_subject(subject, timer) for timer in TASK.timers(beat.state)]
    assert second != first

    async def retired() -> bool:
        return not await store.holds(first)

    await wait_for(retired, within=5)
    assert await store.holds(second)


async def test_worker_goes_offline_when_heartbeats_stop(handler: CommandHandler, org: str) -> None:
    await handler.handle(org, RegisterWorker(worker_id="w1", heartbeat_timeout_seconds=1), actor=WORKER)

    async def offline() -> bool:
        state, _ = await handler.load(org, "worker", "w1")
        return state.status == "offline"

    await wait_for(offline, within=5)


async def test_a_refusal_is_checked_against_the_log_not_a_stale_cache(handler: CommandHandler, org: str) -> None:
    await submit(handler, org)
    await handler.handle(org, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=1), actor=WORKER)
    await asyncio.sleep(1.5)  # the server fires TaskLeaseExpired; this handler's cache still says running
    outcome = await handler.handle(org, ClaimTask(task_id="t1", worker_id="w2", lease_id="l2"), actor=WORKER)
    assert outcome.state.status == "running"
    assert outcome.state.assigned_worker == "w2"
    assert outcome.state.retries == 1


async def test_an_event_too_large_with_its_headers_is_refused_before_it_reaches_the_server(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    """The payload alone fits the server's limit, with the headers it does not: the server would close
    the connection. The store refuses it instead, appends nothing and stays connected."""
    limit = store.nc.max_payload
    before = await store.last_seq()
    # The event alone ends some tens of bytes around the limit; with its ~170 bytes of headers it cannot fit.
    for extra in (0, 20, 40):
        with pytest.raises(EventTooLarge, match=f"at most {limit}"):
            await submit(handler, org, f"big{extra}", payload="x" * (limit - 400 + extra))
    assert await store.last_seq() == before
    assert store.nc.is_connected
    await submit(handler, org, "small-after")
    assert await store.last_seq() > before
