"""Property-based tests of the worker's circuit breaker (core/domain/worker.py): it opens exactly after
``DEFAULT_BREAKER_FAILURES`` consecutive failed attempts, a success resets the count, the cool-down timer or
an admin's reset closes it, and nothing else (heartbeats, registering again) does. Also the claim
index's side: ``excluded_workers`` and the lease expiries it reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from application.open_tasks import OpenTasks
from core.domain.commands import (
    DEFAULT_BREAKER_COOLDOWN_SECONDS,
    DEFAULT_BREAKER_FAILURES,
    SYSTEM,
    Actor,
    ClaimTask,
    Command,
    HeartbeatWorker,
    RecordWorkerAttempt,
    RegisterWorker,
    ResetWorkerBreaker,
    SubmitTask,
)
from core.domain.decider import DecisionContext, Timer
from core.domain.errors import CapabilityMismatch, InvalidTransition, Rejected
from core.domain.events import Event, TaskLeaseExpired, WorkerBreakerOpened, decode_event, encode_event
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject
from core.domain.task_decider import TASK
from core.domain.worker import WORKER, Worker

START = datetime(2026, 1, 1, tzinfo=UTC)
ADMIN = Actor(id="key:admin", roles=frozenset({"admin"}))


def decide(state: Worker | None, command: Command, now: datetime, actor: Actor = SYSTEM) -> list[Event]:
    return list(WORKER.decide(state, command, DecisionContext(org="acme", now=now, actor=actor)))


class BreakerMachine(RuleBasedStateMachine):
    """A model: the count of failures since the last success or reset, and when the breaker opened."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.events: list[Event] = decide(None, RegisterWorker(worker_id="w1", heartbeat_timeout_seconds=3600), START)
        self.state: Worker | None = WORKER.fold(self.events)
        self.armed: list[Timer] = list(WORKER.timers(self.state))
        self.failures = 0
        self.open_until: datetime | None = None
        self.attempts = 0

    def run(self, command: Command, actor: Actor = SYSTEM) -> list[Event]:
        events = decide(self.state, command, self.now, actor)
        before = {t.key: t for t in WORKER.timers(self.state)}
        for event in events:
            self.state = WORKER.evolve(self.state, event)
        self.events += events
        self.armed += [t for t in WORKER.timers(self.state) if before.get(t.key) != t]
        return events

    def attempt(self, outcome: str) -> list[Event]:
        self.attempts += 1
        return self.run(RecordWorkerAttempt(worker_id="w1", task_id=f"t{self.attempts}", outcome=outcome))

    @rule(outcome=st.sampled_from(["failed", "lease_expired"]))
    def fail(self, outcome: str) -> None:
        events = self.attempt(outcome)
        self.failures += 1
        opened = [e for e in events if isinstance(e, WorkerBreakerOpened)]
        if self.open_until is None and self.failures == DEFAULT_BREAKER_FAILURES:
            assert [e.until for e in opened] == [self.now + timedelta(seconds=DEFAULT_BREAKER_COOLDOWN_SECONDS)]
            self.open_until = opened[0].until
        else:
            assert opened == [], "the breaker opens exactly on the Nth consecutive failure, once"

    @rule()
    def succeed(self) -> None:
        if self.failures == 0:
            with pytest.raises(InvalidTransition):
                self.attempt("succeeded")
            return
        self.attempt("succeeded")
        self.failures = 0

    @rule(status=st.sampled_from(["ready", "busy"]))
    def heartbeat(self, status: str) -> None:
        self.run(HeartbeatWorker(worker_id="w1", status=status))

    @rule()
    def register_again(self) -> None:
        self.run(RegisterWorker(worker_id="w1", heartbeat_timeout_seconds=3600))

    @rule()
    def admin_reset(self) -> None:
        if self.open_until is None:
            with pytest.raises(InvalidTransition):
                self.run(ResetWorkerBreaker(worker_id="w1"), ADMIN)
            return
        self.run(ResetWorkerBreaker(worker_id="w1"), ADMIN)
        self.open_until, self.failures = None, 0

    @rule(seconds=st.sampled_from([1, 20, 59, 61]))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        due = sorted((t for t in self.armed if t.event.at <= self.now), key=lambda t: t.event.at)
        self.armed = [t for t in self.armed if t.event.at > self.now]
        for timer in due:
            self.state = WORKER.evolve(self.state, timer.event)
            self.events.append(timer.event)
        if self.open_until is not None and self.open_until <= self.now:
            self.open_until, self.failures = None, 0  # the cool-down closed it

    @precondition(lambda self: self.open_until is not None)
    @rule()
    def a_stale_reset_timer_is_a_no_op(self) -> None:
        stale = [t.event for t in self.armed if t.key.startswith("breaker-")]
        before = self.state
        for event in stale:  # an older trip's timer (another "until") must not close this one
            assert self.state is not None
            old = type(event)(at=event.at, until=event.until - timedelta(seconds=1))
            assert WORKER.evolve(self.state, old) == before

    @invariant()
    def matches_the_model(self) -> None:
        assert self.state is not None
        assert self.state.consecutive_failures == self.failures
        assert self.state.breaker_open_until == self.open_until
        assert (self.state.status == "failed") == (self.open_until is not None)
        assert self.state.breaker_open(self.now) == (self.open_until is not None and self.now < self.open_until)

    @invariant()
    def state_is_the_fold_of_the_log(self) -> None:
        assert WORKER.fold(self.events) == self.state
        assert [decode_event(encode_event(e)) for e in self.events] == self.events


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
TestBreakerMachine = BreakerMachine.TestCase


@given(st.lists(st.sampled_from(["failed", "lease_expired", "succeeded"]), max_size=20))
def test_the_breaker_opens_exactly_when_the_last_n_attempts_failed(outcomes: list[str]) -> None:
    state = WORKER.fold(decide(None, RegisterWorker(worker_id="w1"), START))
    opened_at: int | None = None
    for i, outcome in enumerate(outcomes):
        try:
            events = decide(state, RecordWorkerAttempt(worker_id="w1", task_id=f"t{i}", outcome=outcome), START)
        except Rejected:
            continue
        state = WORKER.fold(events, state)
        if opened_at is None and any(isinstance(e, WorkerBreakerOpened) for e in events):
            opened_at = i
    run, expected = 0, None  # the first attempt that ends a run of N failures with no success between
    for i, outcome in enumerate(outcomes):
        run = 0 if outcome == "succeeded" else run + 1
        if run == DEFAULT_BREAKER_FAILURES and expected is None:
            expected = i
    assert opened_at == expected


def test_the_cool_down_timer_closes_the_breaker_and_re_arms_liveness() -> None:
    state = WORKER.fold(decide(None, RegisterWorker(worker_id="w1", heartbeat_timeout_seconds=3600), START))
    for i in range(DEFAULT_BREAKER_FAILURES):
        state = WORKER.fold(
            decide(state, RecordWorkerAttempt(worker_id="w1", task_id=f"t{i}", outcome="failed"), START), state
        )
    assert state is not None and state.status == "failed"
    [timer] = WORKER.timers(state)
    assert timer.event.at == START + timedelta(seconds=DEFAULT_BREAKER_COOLDOWN_SECONDS)
    closed = WORKER.evolve(state, timer.event)
    assert closed is not None and closed.status == "ready" and closed.breaker_open_until is None
    assert [t.key for t in WORKER.timers(closed)] == [f"liveness-{closed.registrations}"]


def test_excluded_workers_are_never_candidates_and_their_claim_is_refused() -> None:
    ctx = DecisionContext(org="acme", now=START, actor=SYSTEM)
    submit = SubmitTask(task_id="t1", task_type="t", excluded_workers=("bad", "bad", "worse"))
    [submitted] = TASK.decide(None, submit, ctx)
    task = TASK.evolve(None, submitted)
    assert task is not None and task.excluded_workers == ("bad", "worse")
    index = OpenTasks()
    index.put("acme", task, 1)
    assert index.candidates("acme", "default", [], START, 10, worker_id="bad") == []
    assert index.candidates("acme", "default", [], START, 10, worker_id="good") == ["t1"]
    with pytest.raises(CapabilityMismatch):
        TASK.decide(task, ClaimTask(task_id="t1", worker_id="worse", lease_id="l1"), ctx)


def test_the_claim_index_reports_only_the_expiry_of_a_lease_it_knows() -> None:
    ctx = DecisionContext(org="acme", now=START, actor=SYSTEM)
    [submitted] = TASK.decide(None, SubmitTask(task_id="t1", task_type="t"), ctx)
    task = TASK.evolve(None, submitted)
    [claimed] = TASK.decide(task, ClaimTask(task_id="t1", worker_id="w9", lease_id="l1"), ctx)
    index = OpenTasks()
    index.put("acme", TASK.evolve(task, claimed), 2)

    def expiry(lease_id: str, seq: int) -> RecordedEvent:
        event = TaskLeaseExpired(at=START, lease_id=lease_id)
        return RecordedEvent(seq=seq, subject=aggregate_subject("acme", "task", "t1"), event=event, recorded_at=START)

    assert index.lease_expired(expiry("other", 3)) is None  # a stale timer
    assert index.lease_expired(expiry("l1", 2)) is None  # already folded
    assert index.lease_expired(expiry("l1", 3)) == ("acme", "w9", "t1")
