"""The command handler's own rules, on the in-memory event store: idempotent retries, optimistic
concurrency (a lost race is decided again on the new state), the cache, creation without a read, the
timers a command arms and cancels, read-your-writes bookkeeping, and giving up under constant
interference. The real task decider and real commands; the JetStream adapter has its own tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from core.domain.commands import (
    Actor,
    CancelTask,
    ClaimTask,
    Command,
    CompleteTask,
    DecideApproval,
    FailTask,
    HeartbeatTask,
    RequestApproval,
    SubmitTask,
)
from core.domain.decider import DecisionContext
from core.domain.errors import AlreadyExists, CommandIdTaken, ConcurrencyExhausted, Rejected
from core.domain.events import Escalation, TaskHeartbeat, TaskSubmitted
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject
from core.domain.task import Task
from core.domain.task_decider import TASK
from core.log.event_store import StoreError
from core.log.handler import CommandHandler, Outcome, timer_subject
from core.log.memory_store import InMemoryEventStore

T = TypeVar("T")

ORG = "acme"
START = datetime(2026, 1, 1, tzinfo=UTC)
SUBMITTER = Actor("submitter", frozenset({"submitter"}))
ADMIN = Actor("ops", frozenset({"admin"}))
WORKERS = {"w1": Actor("key:w1", frozenset({"worker"})), "w2": Actor("key:w2", frozenset({"worker"}))}
APPROVERS = (Actor("alice", frozenset({"approver"})), Actor("bob", frozenset({"approver"})))
TASKS = ("t1", "t2", "t3")


class Clock:
    """The handler's injected clock: time moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def subject_of(task_id: str) -> str:
    return aggregate_subject(ORG, "task", task_id)


def fold(history: list[RecordedEvent]) -> Task | None:
    return TASK.fold(item.event for item in history)


def timer_subjects(task_subject: str, state: Task | None) -> dict[str, Any]:
    """The schedule subjects the state wants armed, with the event each fires."""
    return {timer_subject(task_subject, timer): timer.event for timer in TASK.timers(state)}


async def own_events(store: InMemoryEventStore, task_id: str, command_id: str) -> list[RecordedEvent]:
    return [item for item in await store.read_subject(subject_of(task_id)) if item.command_id == command_id]


async def submit(handler: CommandHandler, task_id: str = "t1") -> Outcome:
    return await handler.handle(ORG, SubmitTask(task_id=task_id, task_type="deploy", max_retries=1), actor=SUBMITTER)


async def claim(handler: CommandHandler, task_id: str = "t1", worker: str = "w1", lease: str = "l1") -> Outcome:
    command = ClaimTask(task_id=task_id, worker_id=worker, lease_id=lease, lease_seconds=30)
    return await handler.handle(ORG, command, actor=WORKERS[worker])


# --- examples --------------------------------------------------------------------------------------


async def test_a_retried_command_returns_the_original_outcome_and_appends_nothing() -> None:
    store = InMemoryEventStore()
    handler = CommandHandler(store, clock=Clock())
    await submit(handler)
    command = ClaimTask(task_id="t1", worker_id="w1", lease_id="l1")
    first = await handler.handle(ORG, command, actor=WORKERS["w1"], command_id="retry-me")
    last = await store.last_seq()
    warm = await handler.handle(ORG, command, actor=WORKERS["w1"], command_id="retry-me")
    cold = await CommandHandler(store, clock=Clock()).handle(ORG, command, actor=WORKERS["w1"], command_id="retry-me")
    assert warm.duplicate and cold.duplicate
    assert warm.seq == cold.seq == first.seq
    assert warm.state == cold.state == first.state
    assert await store.last_seq() == last
    assert store.appends_tried == 2  # the submit and the first claim: a retry never reaches the log


async def test_a_command_whose_acknowledgement_was_lost_is_found_when_retried() -> None:
    store = InMemoryEventStore()
    handler = CommandHandler(store, clock=Clock())
    await submit(handler)
    store.fail_next_append(StoreError("the log did not acknowledge the append in time"), after_storing=True)
    command = ClaimTask(task_id="t1", worker_id="w1", lease_id="l1")
    with pytest.raises(StoreError):
        await handler.handle(ORG, command, actor=WORKERS["w1"], command_id="claim-1")
    stored = await own_events(store, "t1", "claim-1")
    assert len(stored) == 1
    # This handler's cache never heard of the claim: its append is refused and the reload finds it.
    again = await handler.handle(ORG, command, actor=WORKERS["w1"], command_id="claim-1")
    assert again.duplicate
    assert again.seq == stored[0].seq
    assert await own_events(store, "t1", "claim-1") == stored
    assert again.state.status == "running"


async def test_a_command_id_already_used_on_another_aggregate_is_refused_at_once_not_retried() -> None:
    store = InMemoryEventStore()
    handler = CommandHandler(store, clock=Clock())
    await submit(handler, "t1")
    await submit(handler, "t2")
    await handler.handle(
        ORG, ClaimTask(task_id="t1", worker_id="w1", lease_id="l1"), actor=WORKERS["w1"], command_id="k"
    )
    tried = store.appends_tried
    with pytest.raises(CommandIdTaken, match="new Idempotency-Key"):
        await handler.handle(
            ORG, ClaimTask(task_id="t2", worker_id="w1", lease_id="l2"), actor=WORKERS["w1"], command_id="k"
        )
    assert store.appends_tried == tried + 1, "one refused append, then the reload shows it was another command's"
    assert await own_events(store, "t2", "k") == []


async def test_a_command_that_loses_the_race_is_decided_again_on_the_new_state() -> None:
    store = InMemoryEventStore()
    handler, rival = CommandHandler(store, clock=Clock()), CommandHandler(store, clock=Clock())
    await submit(handler)

    async def rival_cancels(subject: str) -> None:
        await rival.handle(ORG, CancelTask(task_id="t1", reason="changed my mind"), actor=ADMIN)

    store.before_next_append(rival_cancels)
    with pytest.raises(Rejected, match="already cancelled"):
        await claim(handler)
    assert [type(item.event).__name__ for item in await store.read_subject(subject_of("t1"))] == [
        "TaskSubmitted",
        "TaskCancelled",
    ]
    assert handler.cached_state(ORG, "task", "t1").status == "cancelled"


async def test_a_creation_raced_by_another_handler_is_refused_and_never_doubled() -> None:
    """Neither handler has read t1, so each appends its submit expecting an empty subject."""
    store = InMemoryEventStore()
    handler, rival = CommandHandler(store, clock=Clock()), CommandHandler(store, clock=Clock())

    async def rival_submits(subject: str) -> None:
        await submit(rival)

    store.before_next_append(rival_submits)
    with pytest.raises(AlreadyExists):
        await submit(handler)
    submitted = [item for item in await store.read_subject(subject_of("t1")) if isinstance(item.event, TaskSubmitted)]
    assert len(submitted) == 1
    assert store.appends_tried == 1  # refused on the log's state, not guessed twice


async def test_a_refusal_by_a_stale_cache_is_checked_against_the_log() -> None:
    clock = Clock()
    store = InMemoryEventStore()
    handler = CommandHandler(store, clock=clock)
    await submit(handler)
    await claim(handler)
    clock.now += timedelta(seconds=31)
    assert len(store.fire_due(clock.now)) == 1  # the lease expires; the handler's cache still says running
    outcome = await claim(handler, worker="w2", lease="l2")
    assert outcome.state.assigned_worker == "w2"
    assert outcome.state.retries == 1


async def test_a_heartbeat_moves_the_lease_timer_and_completion_cancels_it() -> None:
    clock = Clock()
    store = InMemoryEventStore()
    handler = CommandHandler(store, clock=clock)
    await submit(handler)
    claimed = await claim(handler)
    [first_timer] = timer_subjects(subject_of("t1"), claimed.state)
    clock.now += timedelta(seconds=20)
    beat = HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=30)
    await handler.handle(ORG, beat, actor=WORKERS["w1"])
    assert not await store.holds(first_timer)
    clock.now += timedelta(seconds=20)  # past the first expiry, not the moved one
    assert store.fire_due(clock.now) == []
    await handler.handle(ORG, CompleteTask(task_id="t1", worker_id="w1", lease_id="l1"), actor=WORKERS["w1"])
    assert not await store.holds("cpsched.>")
    assert store.fire_due(clock.now + timedelta(hours=1)) == []


@settings(max_examples=60, deadline=None)
@given(max_attempts=st.integers(1, 5), interference=st.integers(0, 7))
async def test_constant_interference_exhausts_exactly_the_allowed_attempts(
    max_attempts: int, interference: int
) -> None:
    store = InMemoryEventStore()
    clock = Clock()
    handler = CommandHandler(store, clock=clock, max_attempts=max_attempts)
    rival = CommandHandler(store, clock=clock)
    await submit(rival)
    await claim(rival)
    beat = HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1", progress="rival")

    async def rival_beats(subject: str) -> None:
        await rival.handle(ORG, beat, actor=WORKERS["w1"])

    store.before_next_append(rival_beats, times=interference)
    mine = HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1", progress="mine")
    before = store.appends_tried
    if interference >= max_attempts:
        with pytest.raises(ConcurrencyExhausted):
            await handler.handle(ORG, mine, actor=WORKERS["w1"], command_id="mine")
        assert store.appends_tried - before == max_attempts
        assert await own_events(store, "t1", "mine") == []
    else:
        outcome = await handler.handle(ORG, mine, actor=WORKERS["w1"], command_id="mine")
        assert store.appends_tried - before == interference + 1
        assert outcome.state.progress == "mine"
    beats = [item for item in await store.read_subject(subject_of("t1")) if isinstance(item.event, TaskHeartbeat)]
    assert [item.event.progress for item in beats].count("rival") == min(interference, max_attempts)


# --- properties ------------------------------------------------------------------------------------

ANY_KIND = ("submit", "claim", "heartbeat", "ask", "decide", "complete", "fail", "cancel")
PLAN = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(("next",) * 8 + ANY_KIND),  # mostly what the task's state calls for
        "when_running": st.sampled_from(("heartbeat", "heartbeat", "ask", "complete", "fail")),
        "worker": st.sampled_from(sorted(WORKERS)),
        "current": st.integers(0, 4).map(lambda n: n > 0),  # mostly the lease or approval in force
        "seconds": st.sampled_from([5, 30]),
        "approver": st.sampled_from(APPROVERS),
        "approve": st.booleans(),
        "escalate": st.booleans(),
    }
)
"""A command to build from the log's state when it is sent."""


def next_step(state: Task | None, when_running: str) -> str:
    if state is None:
        return "submit"
    if state.status == "pending":
        return "claim"
    if state.status == "awaiting_approval":
        return "decide"
    return when_running if state.status == "running" else "cancel"


@dataclass(frozen=True)
class Applied:
    command: Command
    actor: Actor
    command_id: str
    outcome: Outcome


class HandlerMachine(RuleBasedStateMachine):
    """Two handlers (two gateways) on one log, the second with a one-aggregate cache so it keeps
    guessing creations and reloading; timers fire as time passes; some commands lose their race to a
    rival's command, some lose the acknowledgement of their append."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.store = InMemoryEventStore()
        self.handlers = (
            CommandHandler(self.store, clock=self.clock),
            CommandHandler(self.store, clock=self.clock, cache_size=1),
        )
        self.applied: list[Applied] = []
        self.newest_write: list[dict[str, int]] = [{}, {}]
        self.ids = itertools.count()

    def teardown(self) -> None:
        self.loop.close()

    def run(self, step: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(step)

    def history(self, task_id: str) -> list[RecordedEvent]:
        return self.run(self.store.read_subject(subject_of(task_id)))

    def build(self, task_id: str, plan: dict[str, Any], state: Task | None) -> tuple[Command, Actor]:
        number = next(self.ids)
        kind, worker, current = plan["kind"], plan["worker"], plan["current"]
        if kind == "next":
            kind, current = next_step(state, plan["when_running"]), True
        lease = f"l{number}"
        if current and state is not None and state.lease is not None:
            worker, lease = state.lease.worker_id, state.lease.id
        pending = [a.id for a in state.approvals if a.status == "pending"] if state is not None else []
        approval = pending[0] if current and pending else f"a{number}"
        held = {"task_id": task_id, "worker_id": worker, "lease_id": lease}
        match kind:
            case "submit":
                return SubmitTask(task_id=task_id, task_type="deploy", max_retries=1), SUBMITTER
            case "claim":
                return ClaimTask(**held | {"lease_id": f"l{number}"}, lease_seconds=plan["seconds"]), WORKERS[worker]
            case "heartbeat":
                return HeartbeatTask(**held, lease_seconds=plan["seconds"]), WORKERS[worker]
            case "ask":
                escalation = Escalation(after_seconds=plan["seconds"], approvers=("role:admin",))
                return RequestApproval(
                    **held,
                    approval_id=f"a{number}",
                    reason="prod",
                    timeout_seconds=plan["seconds"] * 2,
                    escalation=escalation if plan["escalate"] else None,
                ), WORKERS[worker]
            case "decide":
                decision = "approve" if plan["approve"] else "reject"
                command = DecideApproval(task_id=task_id, approval_id=approval, decision=decision, comment="why")
                return command, plan["approver"]
            case "complete":
                return CompleteTask(**held, result=number), WORKERS[worker]
            case "fail":
                return FailTask(**held, error="boom"), WORKERS[worker]
            case _:
                return CancelTask(task_id=task_id, reason="no longer needed"), ADMIN

    def wrote(self, via: int, actor: Actor, seq: int) -> None:
        newest = self.newest_write[via]
        newest[actor.id] = max(seq, newest.get(actor.id, 0))
        assert self.handlers[via].last_write_of(actor.id) == newest[actor.id]

    def decide(self, via: int, task_id: str, command: Command, actor: Actor) -> None:
        """Send a new command and check it against what the decider makes of the log's own state."""
        handler = self.handlers[via]
        subject = subject_of(task_id)
        command_id = f"c{next(self.ids)}"
        context = DecisionContext(org=ORG, now=self.clock.now, actor=actor)
        before = self.run(self.store.last_seq())
        try:
            outcome = self.run(handler.handle(ORG, command, actor=actor, command_id=command_id))
        except Rejected as refusal:
            self.check_refusal(via, task_id, command, context, command_id, refusal)
            return
        history = self.history(task_id)
        first = outcome.events[0].seq
        old = fold([item for item in history if item.seq < first])
        # Decided on the state right before its events: never on a stale one.
        assert [item.event for item in outcome.events] == list(TASK.decide(old, command, context))
        assert [item.seq for item in history if item.command_id == command_id] == [e.seq for e in outcome.events]
        assert handler.cached_state(ORG, "task", task_id) == outcome.state == fold(history)
        # Armed: exactly the timers the new state wants and the old did not; cancelled: the reverse.
        wanted, had = timer_subjects(subject, outcome.state), timer_subjects(subject, old)
        armed = {
            item.subject: item.event
            for item in self.run(self.store.read_subject("cpsched.>", after_seq=before))
            if item.causation_id == command_id
        }
        assert armed == {s: event for s, event in wanted.items() if s not in had}
        for cancelled in had.keys() - wanted.keys():
            assert not self.run(self.store.holds(cancelled))
        self.wrote(via, actor, outcome.seq)
        self.applied.append(Applied(command, actor, command_id, outcome))

    def check_nothing_stored_since(self, seq: int) -> None:
        """No event and no timer definition since ``seq``. (The log's last sequence may have moved: a
        timer definition armed for an append that is then refused keeps its sequence when purged.)"""
        assert self.run(self.store.read_subject(">", after_seq=seq)) == []

    def check_refusal(
        self, via: int, task_id: str, command: Command, context: DecisionContext, command_id: str, refusal: Rejected
    ) -> None:
        """Refused on the log's state, never on a stale cache, and nothing of it appended."""
        state = fold(self.history(task_id))
        with pytest.raises(Rejected) as fresh:
            TASK.decide(state, command, context)
        assert (type(refusal), refusal.detail) == (type(fresh.value), fresh.value.detail)
        assert self.run(own_events(self.store, task_id, command_id)) == []
        assert self.handlers[via].cached_state(ORG, "task", task_id) == state

    @rule(via=st.integers(0, 1), task_id=st.sampled_from(TASKS), plan=PLAN)
    def command(self, via: int, task_id: str, plan: dict[str, Any]) -> None:
        self.decide(via, task_id, *self.build(task_id, plan, fold(self.history(task_id))))

    @rule(via=st.integers(0, 1), task_id=st.sampled_from(TASKS), plan=PLAN, rival_plan=PLAN)
    def command_that_races_a_rival(
        self, via: int, task_id: str, plan: dict[str, Any], rival_plan: dict[str, Any]
    ) -> None:
        rival = 1 - via

        async def rival_goes_first(subject: str) -> None:
            command, actor = self.build(task_id, rival_plan, fold(await self.store.read_subject(subject)))
            command_id = f"c{next(self.ids)}"
            try:
                outcome = await self.handlers[rival].handle(ORG, command, actor=actor, command_id=command_id)
            except Rejected:
                return
            self.wrote(rival, actor, outcome.seq)
            self.applied.append(Applied(command, actor, command_id, outcome))

        command, actor = self.build(task_id, plan, fold(self.history(task_id)))
        self.store.before_next_append(rival_goes_first)
        self.decide(via, task_id, command, actor)
        self.store.clear_injected()

    @precondition(lambda self: self.applied)
    @rule(via=st.integers(0, 1), pick=st.integers(0, 10_000))
    def retried_command(self, via: int, pick: int) -> None:
        applied = self.applied[pick % len(self.applied)]
        before = self.run(self.store.last_seq())
        again = self.run(
            self.handlers[via].handle(ORG, applied.command, actor=applied.actor, command_id=applied.command_id)
        )
        assert again.duplicate
        assert again.seq == applied.outcome.seq
        assert [item.event for item in again.events] == [item.event for item in applied.outcome.events]
        assert again.state == applied.outcome.state
        self.check_nothing_stored_since(before)
        self.wrote(via, applied.actor, again.seq)

    @rule(via=st.integers(0, 1), retry_via=st.integers(0, 1), task_id=st.sampled_from(TASKS), plan=PLAN)
    def command_whose_acknowledgement_is_lost(
        self, via: int, retry_via: int, task_id: str, plan: dict[str, Any]
    ) -> None:
        command, actor = self.build(task_id, plan, fold(self.history(task_id)))
        context = DecisionContext(org=ORG, now=self.clock.now, actor=actor)
        try:
            expected = list(TASK.decide(fold(self.history(task_id)), command, context))
        except Rejected:
            return  # it would never reach the log
        command_id = f"c{next(self.ids)}"
        self.store.fail_next_append(StoreError("ack lost"), after_storing=True)
        with pytest.raises(StoreError):
            self.run(self.handlers[via].handle(ORG, command, actor=actor, command_id=command_id))
        stored = self.run(own_events(self.store, task_id, command_id))
        assert [item.event for item in stored] == expected
        before = self.run(self.store.last_seq())
        again = self.run(self.handlers[retry_via].handle(ORG, command, actor=actor, command_id=command_id))
        assert again.duplicate
        assert again.seq == stored[-1].seq
        self.check_nothing_stored_since(before)
        self.wrote(retry_via, actor, again.seq)
        self.applied.append(Applied(command, actor, command_id, again))
        # The adapter disarmed the command's timers, not knowing it was stored: a rearm puts back
        # exactly what the state wants and the log lacks.
        subject = subject_of(task_id)
        wanted = timer_subjects(subject, fold(self.history(task_id)))
        missing = {s for s in wanted if not self.run(self.store.holds(s))}
        rearmed = self.run(self.handlers[retry_via].rearm(ORG, "task", task_id, actor="reconciler"))
        assert set(rearmed) == missing
        assert all(self.run(self.store.holds(s)) for s in wanted)

    @rule(seconds=st.sampled_from([1, 6, 11, 31, 61]))
    def time_passes(self, seconds: int) -> None:
        self.clock.now += timedelta(seconds=seconds)
        self.store.fire_due(self.clock.now)

    @invariant()
    def no_task_is_created_twice(self) -> None:
        for task_id in TASKS:
            created = [item for item in self.history(task_id) if isinstance(item.event, TaskSubmitted)]
            assert len(created) <= 1


HandlerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
test_the_handler_keeps_its_rules_whatever_the_interleaving = HandlerMachine.TestCase
