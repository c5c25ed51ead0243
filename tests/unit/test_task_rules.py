"""The rules of docs/api.md as readable examples against the pure task decider."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.domain.commands import (
    Actor,
    ClaimTask,
    Command,
    DecideApproval,
    FailTask,
    HeartbeatTask,
    RequestApproval,
    SubmitTask,
)
from core.domain.decider import DecisionContext
from core.domain.errors import (
    AlreadyDecided,
    CapabilityMismatch,
    InvalidCommand,
    LeaseLost,
    NotPermitted,
    NotReady,
)
from core.domain.events import Escalation, Event, WorkflowRef
from core.domain.task import Task, hosted_workflow_versions, retry_delay
from core.domain.task_decider import TASK

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SUBMITTER = Actor("sub", frozenset({"submitter"}))
WORKER = Actor("wkey", frozenset({"worker"}))
ALICE = Actor("alice", frozenset({"approver"}))
BOB = Actor("bob", frozenset({"approver"}))


class Scenario:
    def __init__(self, **submit: object) -> None:
        self.state: Task | None = None
        self.now = T0
        self.armed: list[Event] = []
        self.run(SubmitTask(task_id="t1", task_type="deploy", **submit), SUBMITTER)  # type: ignore[arg-type]

    def run(self, command: Command, actor: Actor = WORKER) -> Task:
        events = TASK.decide(self.state, command, DecisionContext("acme", self.now, actor))
        self.state = TASK.fold(events, self.state)
        self.armed += [t.event for t in TASK.timers(self.state) if t.event not in self.armed]
        assert self.state is not None
        return self.state

    def wait(self, seconds: float) -> Task:
        """Let time pass and fire every timer ever armed that falls due: one replaced or cancelled
        may still arrive (a failed purge, a reconciler re-arming from an older read model)."""
        self.now += timedelta(seconds=seconds)
        while due := sorted((e for e in self.armed if e.at <= self.now), key=lambda e: e.at):
            self.armed.remove(due[0])
            self.state = TASK.evolve(self.state, due[0])
            self.armed += [t.event for t in TASK.timers(self.state) if t.event not in self.armed]
        assert self.state is not None
        return self.state

    def claim(self, lease: str = "l1", caps: tuple[str, ...] = (), lease_seconds: float = 30) -> Task:
        return self.run(
            ClaimTask(task_id="t1", worker_id="w1", lease_id=lease, capabilities=caps, lease_seconds=lease_seconds)
        )

    def ask(self, approval: str = "a1", **options: object) -> Task:
        assert self.state is not None
        assert self.state.lease is not None
        return self.run(
            RequestApproval(
                task_id="t1",
                worker_id="w1",
                lease_id=self.state.lease.id,
                approval_id=approval,
                reason="prod deploy",
                **options,
            )
        )  # type: ignore[arg-type]

    def vote(self, actor: Actor, decision: str = "approve", approval: str = "a1") -> Task:
        return self.run(
            DecideApproval(
                task_id="t1",
                approval_id=approval,
                decision=decision,  # type: ignore[arg-type]
                comment="ok",
            ),
            actor,
        )


def test_capabilities_must_cover_the_required_ones() -> None:
    s = Scenario(required_capabilities=("gpu", "python"))
    with pytest.raises(CapabilityMismatch):
        s.claim(caps=("python",))
    assert s.claim(caps=("gpu", "python", "docker")).status == "running"


def test_renewed_lease_is_not_expired_by_its_old_timer() -> None:
    s = Scenario()
    s.claim(lease_seconds=10)
    s.wait(8)
    s.run(HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=10))
    assert s.wait(5).status == "running"
    assert s.wait(6).status == "pending"


def test_unrenewed_lease_returns_the_task_then_times_it_out_when_retries_run_out() -> None:
    s = Scenario(max_retries=1)
    s.claim("l1", lease_seconds=5)
    task = s.wait(6)
    assert (task.status, task.retries) == ("pending", 1)
    s.claim("l2", lease_seconds=5)
    assert s.wait(6).status == "timed_out"


def test_retryable_failure_backs_off_deterministically() -> None:
    s = Scenario(max_retries=2, retry_backoff_seconds=10)
    s.claim()
    task = s.run(FailTask(task_id="t1", worker_id="w1", lease_id="l1", error="flaky"))
    assert task.status == "pending"
    assert task.not_before == T0 + retry_delay("t1", 1, 10)
    assert timedelta(seconds=10) <= retry_delay("t1", 1, 10) < timedelta(seconds=12.5)
    with pytest.raises(NotReady):
        s.claim("l2")
    s.wait(13)
    assert s.claim("l2").status == "running"


def test_lost_lease_cannot_complete() -> None:
    s = Scenario()
    s.claim(lease_seconds=5)
    s.now += timedelta(seconds=5)
    with pytest.raises(LeaseLost):
        s.run(HeartbeatTask(task_id="t1", worker_id="w1", lease_id="l1"))


def test_requester_cannot_approve_and_quorum_needs_distinct_approvers() -> None:
    s = Scenario()
    s.claim()
    s.ask(quorum=2)
    with pytest.raises(NotPermitted):
        s.vote(WORKER)
    with pytest.raises(NotPermitted):
        s.vote(Actor("w1", frozenset({"approver"})))
    assert s.vote(ALICE).status == "awaiting_approval"
    with pytest.raises(AlreadyDecided):
        s.vote(ALICE)
    task = s.vote(BOB)
    assert task.status == "pending"
    assert task.approvals[0].status == "approved"
    with pytest.raises(AlreadyDecided):
        s.vote(Actor("carol", frozenset({"approver"})))


def test_one_rejection_rejects_and_needs_a_reason() -> None:
    s = Scenario()
    s.claim()
    s.ask(quorum=2)
    s.vote(ALICE)
    with pytest.raises(InvalidCommand):
        s.run(DecideApproval(task_id="t1", approval_id="a1", decision="reject"), BOB)
    task = s.vote(BOB, "reject")
    assert task.approvals[0].status == "rejected"
    assert task.status == "pending"


def test_named_approvers_only() -> None:
    s = Scenario()
    s.claim()
    s.ask(approvers=("alice",))
    with pytest.raises(NotPermitted):
        s.vote(BOB)
    assert s.vote(ALICE).approvals[0].status == "approved"


def test_unreachable_quorum_is_refused() -> None:
    s = Scenario()
    s.claim()
    with pytest.raises(InvalidCommand):
        s.ask(approvers=("alice",), quorum=2)


def test_escalation_adds_approvers_and_timeout_returns_the_task() -> None:
    s = Scenario()
    s.claim()
    s.ask(approvers=("alice",), timeout_seconds=60, escalation=Escalation(after_seconds=30, approvers=("bob",)))
    with pytest.raises(NotPermitted):
        s.vote(BOB)
    s.wait(31)
    assert s.vote(BOB).approvals[0].status == "approved"

    late = Scenario()
    late.claim()
    late.ask(timeout_seconds=60)
    task = late.wait(61)
    assert (task.status, task.approvals[0].status) == ("pending", "timed_out")


def test_deadline_bounds_the_whole_run_from_first_claim() -> None:
    s = Scenario(timeout_seconds=100)
    s.wait(500)
    s.claim()
    s.ask()
    task = s.wait(101)
    assert task.status == "timed_out"
    assert task.approvals[0].status == "pending"


def test_a_task_that_names_no_workflow_version_is_pinned_to_the_newest_its_first_runner_hosts() -> None:
    scenario = Scenario(workflow=WorkflowRef("deploy"), max_retries=2, retry_backoff_seconds=1)
    hosts_two = ("workflow:deploy", "workflow:deploy@v1", "workflow:deploy@v2", "workflow:other@v9")
    claimed = scenario.claim(caps=hosts_two, lease_seconds=5)
    assert claimed.workflow == WorkflowRef("deploy", 2)
    assert claimed.required_capabilities == ("workflow:deploy@v2",)
    scenario.wait(6)  # the lease expires: the next runner must host version 2, not merely "deploy"
    scenario.wait(2)
    with pytest.raises(CapabilityMismatch, match="workflow:deploy@v2"):
        scenario.claim(lease="l2", caps=("workflow:deploy", "workflow:deploy@v1"))
    assert scenario.claim(lease="l3", caps=hosts_two).workflow == WorkflowRef("deploy", 2)


def test_a_pinned_workflow_version_is_never_changed_by_a_claim() -> None:
    scenario = Scenario(workflow=WorkflowRef("deploy", 1))
    claimed = scenario.claim(caps=("workflow:deploy", "workflow:deploy@v1", "workflow:deploy@v2"))
    assert claimed.workflow == WorkflowRef("deploy", 1)
    assert claimed.required_capabilities == ("workflow:deploy@v1",)


def test_hosted_workflow_versions_reads_only_versioned_workflow_capabilities() -> None:
    assert hosted_workflow_versions(
        ["gpu", "workflow:a", "workflow:a@v1", "workflow:a@v10", "workflow:b@vx", "workflow:c@v3", "x:d@v1"]
    ) == {"a": {1, 10}, "c": {3}}


def test_an_approval_asked_for_without_an_id_is_named_by_the_task_it_is_decided_on() -> None:
    scenario = Scenario()
    scenario.claim()
    first = scenario.ask(approval=None)  # type: ignore[arg-type]
    assert [approval.id for approval in first.approvals] == ["t1-1"]
    scenario.vote(ALICE, approval="t1-1")
    scenario.claim(lease="l2")
    second = scenario.ask(approval=None)  # type: ignore[arg-type]
    assert [approval.id for approval in second.approvals] == ["t1-1", "t1-2"]
