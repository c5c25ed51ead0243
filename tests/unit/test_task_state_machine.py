"""Property-based tests of the task aggregate: random command sequences, random passage of time and
timers firing (also late, after their guarded thing has moved on), checked against the promises the
product makes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from core.domain.commands import (
    Actor,
    CancelTask,
    ClaimTask,
    Command,
    CompleteTask,
    DecideApproval,
    FailTask,
    HeartbeatTask,
    RecordOperation,
    ReportNonDeterminism,
    RequestApproval,
    ResumeTask,
    SignalTask,
    StartSleep,
    SubmitTask,
    WaitForSignal,
)
from core.domain.decider import DecisionContext, Timer
from core.domain.errors import Rejected
from core.domain.events import (
    TERMINAL_STATUSES,
    Escalation,
    Event,
    TaskClaimed,
    TaskLeaseExpired,
    decode_event,
    encode_event,
)
from core.domain.task import Task
from core.domain.task_decider import TASK

TASK_ID = "t1"
WORKERS = ("w1", "w2", "w3")
CAPABILITIES = ("gpu", "python", "prod")
ACTORS = (
    Actor("alice", frozenset({"approver"})),
    Actor("bob", frozenset({"approver"})),
    Actor("carol", frozenset({"admin"})),
    Actor("dave", frozenset({"viewer"})),
    Actor("w1", frozenset({"worker"})),
    Actor("submitter", frozenset({"submitter"})),
)
CLAIMERS = (
    Actor("key:w1", frozenset({"worker"})),
    Actor("key:w2", frozenset({"worker"})),
    Actor("jwt:ops", frozenset({"admin"})),
)
START = datetime(2026, 1, 1, tzinfo=UTC)
STALE = st.integers(0, 4).map(lambda n: n == 0)
BY = st.none() | st.sampled_from((*CLAIMERS, *ACTORS))
"""Who sends a lease-bound command: None for the credential that claimed, else anyone (the claimer too)."""


class TaskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state: Task | None = None
        self.events: list[Event] = []
        self.now = START
        self.armed: list[Timer] = []  # every timer ever armed; cancellation may fail, so all may fire
        self.lease_counter = 0
        self.approval_counter = 0
        self.terminal_snapshot: Task | None = None
        self.closed_approvals: dict[str, Any] = {}
        self.last_journal: tuple[Any, ...] = ()

    # --- helpers ----------------------------------------------------------------------------------

    def run(self, command: Command, actor: Actor = ACTORS[5]) -> bool:
        before = self.state
        try:
            events = TASK.decide(before, command, DecisionContext(org="acme", now=self.now, actor=actor))
        except Rejected:
            return False
        assert events, "an accepted command appends at least one event"
        if before is not None and before.is_terminal:
            raise AssertionError(f"{type(command).__name__} was accepted on a {before.status} task")
        self.apply(events)
        return True

    def apply(self, events: list[Event] | tuple[Event, ...]) -> None:
        before = self.state
        for event in events:
            previous = self.state
            self.state = TASK.evolve(self.state, event)
            self.events.append(event)
            if isinstance(event, TaskLeaseExpired) and self.state != previous:
                assert previous is not None
                assert previous.lease is not None
                assert previous.lease.expires_at <= self.now, "a lease never expires before its time"
        new_timers = {t.key: t for t in TASK.timers(self.state)}
        old_timers = {t.key: t for t in TASK.timers(before)}
        self.armed += [t for k, t in new_timers.items() if old_timers.get(k) != t]

    def lease(self, stale: bool) -> tuple[str, str]:
        if self.state is not None and self.state.lease is not None and not stale:
            return self.state.lease.worker_id, self.state.lease.id
        return "w1", f"stale{self.lease_counter}"

    def sender(self, by: Actor | None) -> tuple[Actor, bool]:
        """The actor of a lease-bound command, and whether it is someone other than the lease's holder."""
        holder = self.state.lease.holder if self.state is not None and self.state.lease is not None else None
        if by is None:
            return next((a for a in CLAIMERS if a.id == holder), CLAIMERS[0]), False
        return by, by.id != holder

    def run_lease_bound(self, command: Command, by: Actor | None) -> bool:
        """Run a lease-bound command; one from anyone but the claimer is refused and changes nothing."""
        actor, intruder = self.sender(by)
        before, events = self.state, len(self.events)
        accepted = self.run(command, actor=actor)
        if intruder:
            assert not accepted, f"{type(command).__name__} from {actor.id}, who did not claim, was accepted"
            assert self.state == before and len(self.events) == events
        return accepted

    # --- rules ------------------------------------------------------------------------------------

    @initialize(
        retries=st.integers(0, 3),
        caps=st.sets(st.sampled_from(CAPABILITIES), max_size=2),
        timeout=st.none() | st.floats(5, 500),
        backoff=st.sampled_from([0.0, 1.0, 5.0]),
    )
    def submit(self, retries: int, caps: set[str], timeout: float | None, backoff: float) -> None:
        accepted = self.run(
            SubmitTask(
                task_id=TASK_ID,
                task_type="deploy",
                payload={"env": "prod"},
                max_retries=retries,
                required_capabilities=tuple(caps),
                timeout_seconds=timeout,
                retry_backoff_seconds=backoff,
            )
        )
        assert accepted

    @rule(
        worker=st.sampled_from(WORKERS),
        extra=st.sets(st.sampled_from(CAPABILITIES)),
        drop_one=st.integers(0, 5),
        lease_seconds=st.sampled_from([5.0, 30.0]),
        claimer=st.sampled_from(CLAIMERS),
    )
    def claim(self, worker: str, extra: set[str], drop_one: int, lease_seconds: float, claimer: Actor) -> None:
        before = self.state
        assert before is not None
        caps = set(before.required_capabilities) | extra
        if drop_one == 0 and before.required_capabilities:
            caps.discard(before.required_capabilities[0])
        self.lease_counter += 1
        accepted = self.run(
            ClaimTask(
                task_id=TASK_ID,
                worker_id=worker,
                lease_id=f"l{self.lease_counter}",
                capabilities=tuple(caps),
                lease_seconds=lease_seconds,
            ),
            actor=claimer,
        )
        if accepted:
            assert before is not None
            assert before.status == "pending", "no double claim: only a pending task can be claimed"
            assert before.parked is None, "a parked task is never claimed"
            assert before.signal_wait is None, "a task waiting for a signal is never claimed"
            assert set(before.required_capabilities) <= caps
            assert before.not_before is None or self.now >= before.not_before
            assert self.state is not None and self.state.lease is not None
            assert self.state.lease.holder == claimer.id, "the lease is bound to the credential that claimed"

    @rule(stale=STALE, seconds=st.none() | st.sampled_from([5.0, 60.0]), by=BY)
    def heartbeat(self, stale: bool, seconds: float | None, by: Actor | None) -> None:
        worker, lease_id = self.lease(stale)
        accepted = self.run_lease_bound(
            HeartbeatTask(task_id=TASK_ID, worker_id=worker, lease_id=lease_id, lease_seconds=seconds), by
        )
        assert not (accepted and stale), "a heartbeat on a lease that is not held must be refused"

    @rule(
        stale=STALE,
        approvers=st.sampled_from([("role:approver",), ("alice", "bob"), ("alice",), ("role:finance", "bob")]),
        quorum=st.integers(1, 3),
        timeout=st.none() | st.floats(10, 100),
        escalate=st.booleans(),
        by=BY,
    )
    def request_approval(
        self,
        stale: bool,
        approvers: tuple[str, ...],
        quorum: int,
        timeout: float | None,
        escalate: bool,
        by: Actor | None,
    ) -> None:
        worker, lease_id = self.lease(stale)
        self.approval_counter += 1
        escalation = Escalation(after_seconds=5, approvers=("carol",)) if escalate else None
        accepted = self.run_lease_bound(
            RequestApproval(
                task_id=TASK_ID,
                worker_id=worker,
                lease_id=lease_id,
                approval_id=f"a{self.approval_counter}",
                reason="deploy to prod",
                approvers=approvers,
                quorum=quorum,
                timeout_seconds=timeout,
                escalation=escalation,
            ),
            by,
        )
        if accepted:
            assert self.state is not None and self.state.status == "awaiting_approval"
            assert self.state.lease is None, "asking for approval releases the lease"

    @rule(
        actor=st.sampled_from(ACTORS),
        which=st.integers(0, 5),
        approve=st.booleans(),
        comment=st.none() | st.just("looks fine"),
    )
    def decide_approval(self, actor: Actor, which: int, approve: bool, comment: str | None) -> None:
        approval_id = f"a{which}"
        before = self.state.approval(approval_id) if self.state else None
        accepted = self.run(
            DecideApproval(
                task_id=TASK_ID,
                approval_id=approval_id,
                decision="reject" if approve == 0 else "approve",
                comment=comment,
            ),
            actor=actor,
        )
        if accepted:
            assert before is not None and before.status == "pending", "an approval is decided once"
            assert actor.id not in (before.requested_by, before.requested_by_actor), "requester cannot decide"
            assert actor.roles & {"approver", "admin"}

    @rule(stale=STALE, by=BY)
    def complete(self, stale: bool, by: Actor | None) -> None:
        worker, lease_id = self.lease(stale)
        accepted = self.run_lease_bound(
            CompleteTask(task_id=TASK_ID, worker_id=worker, lease_id=lease_id, result={"ok": True}), by
        )
        assert not (accepted and stale)

    @rule(stale=STALE, retryable=st.booleans(), by=BY)
    def fail(self, stale: bool, retryable: bool, by: Actor | None) -> None:
        worker, lease_id = self.lease(stale)
        before = self.state
        accepted = self.run_lease_bound(
            FailTask(task_id=TASK_ID, worker_id=worker, lease_id=lease_id, error="boom", retryable=retryable), by
        )
        assert not (accepted and stale)
        if accepted and before is not None and self.state is not None and self.state.status == "pending":
            assert retryable and self.state.retries == before.retries + 1

    @rule(chance=st.integers(0, 4))
    def cancel(self, chance: int) -> None:
        if chance:
            return
        before = self.state
        accepted = self.run(CancelTask(task_id=TASK_ID, reason="no longer needed"))
        if before is not None and not before.is_terminal:
            assert accepted, "a task that is not terminal can always be cancelled"

    @rule(stale=STALE, offset=st.sampled_from([0, 0, 0, 1, -1]), kind=st.sampled_from(["step", "llm", "now"]), by=BY)
    def record_operation(self, stale: bool, offset: int, kind: str, by: Actor | None) -> None:
        worker, lease_id = self.lease(stale)
        before = self.state
        index = (len(before.journal) if before else 0) + offset
        if index < 0:
            return
        accepted = self.run_lease_bound(
            RecordOperation(
                task_id=TASK_ID,
                worker_id=worker,
                lease_id=lease_id,
                index=index,
                kind=kind,
                name=f"op{index}",
                result={"n": index},
            ),
            by,
        )
        if accepted:
            assert not stale
            assert offset == 0, "an operation is recorded only at the next position"

    @rule(stale=STALE, seconds=st.sampled_from([1.0, 30.0]), by=BY)
    def sleep(self, stale: bool, seconds: float, by: Actor | None) -> None:
        worker, lease_id = self.lease(stale)
        index = len(self.state.journal) if self.state else 0
        sleep = StartSleep(task_id=TASK_ID, worker_id=worker, lease_id=lease_id, index=index, seconds=seconds)
        if self.run_lease_bound(sleep, by):
            assert self.state is not None
            assert self.state.status == "pending"
            assert self.state.not_before == self.now + timedelta(seconds=seconds)

    @rule(stale=STALE, by=BY)
    def non_determinism(self, stale: bool, by: Actor | None) -> None:
        worker, lease_id = self.lease(stale)
        index = len(self.state.journal) if self.state else 0
        if self.run_lease_bound(
            ReportNonDeterminism(
                task_id=TASK_ID,
                worker_id=worker,
                lease_id=lease_id,
                index=index,
                expected={"kind": "step"},
                actual={"kind": "llm"},
            ),
            by,
        ):
            assert self.state is not None
            assert self.state.parked is not None

    @rule()
    def resume(self) -> None:
        before = self.state
        accepted = self.run(ResumeTask(task_id=TASK_ID), actor=ACTORS[2])
        assert accepted == (before is not None and before.parked is not None and not before.is_terminal)

    @rule(name=st.sampled_from(["go", "input"]), actor=st.sampled_from(ACTORS))
    def signal(self, name: str, actor: Actor) -> None:
        before = self.state
        accepted = self.run(SignalTask(task_id=TASK_ID, name=name, payload={"from": actor.id}), actor=actor)
        if accepted:
            assert actor.roles & {"admin", "submitter", "approver"}, "only these roles may signal"
            assert before is not None and self.state is not None
            assert self.state.signals_received == before.signals_received + 1

    @rule(
        stale=STALE,
        name=st.sampled_from(["go", "input"]),
        timeout=st.none() | st.sampled_from([1.0, 30.0]),
        by=BY,
    )
    def wait_for_signal(self, stale: bool, name: str, timeout: float | None, by: Actor | None) -> None:
        worker, lease_id = self.lease(stale)
        index = len(self.state.journal) if self.state else 0
        wait = WaitForSignal(
            task_id=TASK_ID, worker_id=worker, lease_id=lease_id, index=index, name=name, timeout_seconds=timeout
        )
        kept = any(s.name == name for s in self.state.signals) if self.state else False
        if self.run_lease_bound(wait, by):
            assert self.state is not None
            if kept:
                assert self.state.status == "running", "a kept signal is taken at once; the lease stays"
                assert self.state.journal[-1].kind == "signal"
            else:
                assert self.state.status == "pending" and self.state.signal_wait is not None

    @rule(seconds=st.sampled_from([0.5, 3, 10, 40, 120]))
    def time_passes(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        due = sorted((t for t in self.armed if t.event.at <= self.now), key=lambda t: t.event.at)
        self.armed = [t for t in self.armed if t.event.at > self.now]
        for timer in due:
            self.apply([timer.event])

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def lease_held_exactly_while_running(self) -> None:
        if self.state is not None:
            assert (self.state.status == "running") == (self.state.lease is not None)
            assert (self.state.lease is None) == (self.state.assigned_worker is None)

    @invariant()
    def retries_never_exceed_max(self) -> None:
        if self.state is not None:
            assert 0 <= self.state.retries <= self.state.max_retries

    @invariant()
    def terminal_states_are_terminal(self) -> None:
        if self.terminal_snapshot is not None:
            assert self.state == self.terminal_snapshot
        elif self.state is not None and self.state.status in TERMINAL_STATUSES:
            self.terminal_snapshot = self.state
            assert self.state.completed_at is not None

    @invariant()
    def approvals_are_decided_once_and_by_the_rules(self) -> None:
        if self.state is None:
            return
        for approval in self.state.approvals:
            if approval.id in self.closed_approvals:
                assert approval == self.closed_approvals[approval.id], "a closed approval never changes"
                continue
            votes = [v for v in approval.decisions if v.decision == "approve"]
            assert len({v.by for v in approval.decisions}) == len(approval.decisions), "one vote per person"
            if approval.status == "approved":
                assert len(votes) >= approval.quorum
            if approval.status == "rejected":
                assert any(v.decision == "reject" for v in approval.decisions)
            if approval.status != "pending":
                self.closed_approvals[approval.id] = approval
        if self.state.status == "awaiting_approval":
            assert any(a.status == "pending" for a in self.state.approvals)

    @invariant()
    def state_is_the_fold_of_the_log(self) -> None:
        assert TASK.fold(self.events) == self.state
        decoded = [decode_event(encode_event(e)) for e in self.events]
        assert decoded == self.events, "every event survives the trip through the log's encoding"

    @invariant()
    def the_journal_only_grows_and_has_no_gaps(self) -> None:
        journal = self.state.journal if self.state else ()
        assert [entry.index for entry in journal] == list(range(len(journal)))
        assert journal[: len(self.last_journal)] == self.last_journal, "recorded operations never change"
        self.last_journal = journal

    @invariant()
    def a_signal_wait_holds_no_lease_and_the_next_journal_position(self) -> None:
        wait = self.state.signal_wait if self.state else None
        if wait is not None and self.state is not None and not self.state.is_terminal:
            assert self.state.status == "pending" and self.state.lease is None
            assert wait.index == len(self.state.journal)
            assert all(s.name != wait.name for s in self.state.signals), "a kept signal would have been taken"

    @invariant()
    def attempts_count_claims(self) -> None:
        claims = [e for e in self.events if isinstance(e, TaskClaimed)]
        if claims and self.state is not None:
            assert claims[-1].attempt <= self.state.max_retries + 1


TaskMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestTaskStateMachine = TaskMachine.TestCase
