"""A command recorded as several events is never seen in half: ``state --at`` and a fork stop before it.
Logs recorded before the deciding vote moved into ``ApprovalDecided`` hold such commands (a vote and the
decision it caused, one atomic batch); forks still write their copies as one."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from core.domain.commands import Actor, ClaimTask, Command, DecideApproval, RequestApproval, SubmitTask
from core.domain.decider import DecisionContext
from core.domain.events import ApprovalDecided, ApprovalRequested, ApprovalVoteCast, TaskClaimed, TaskSubmitted
from core.domain.history import plan_fork, state_at
from core.domain.records import RecordedEvent
from core.domain.task_decider import TASK

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WORKER = Actor("key:w", frozenset({"worker"}))
APPROVER = Actor("key:a", frozenset({"approver"}))


def recorded_before_the_vote_moved() -> list[RecordedEvent]:
    """Submit, claim, ask, then the approval as the log recorded it until 2026-12-07: the vote and the
    decision as two events of one command."""
    commands: list[tuple[Command, Actor]] = [
        (SubmitTask(task_id="t1", task_type="deploy"), WORKER),
        (ClaimTask(task_id="t1", worker_id="w1", lease_id="l1"), WORKER),
        (RequestApproval(task_id="t1", worker_id="w1", lease_id="l1", approval_id="t1-1", reason="ship?"), WORKER),
        (DecideApproval(task_id="t1", approval_id="t1-1", decision="approve"), APPROVER),
    ]
    state = None
    history: list[RecordedEvent] = []
    for number, (command, actor) in enumerate(commands, start=1):
        events = list(TASK.decide(state, command, DecisionContext("acme", T0, actor)))
        state = TASK.fold(events, state)
        if isinstance(events[-1], ApprovalDecided) and (vote := events[-1].vote) is not None:
            cast = ApprovalVoteCast(at=T0, approval_id="t1-1", **msgspec.structs.asdict(vote))
            events = [cast, msgspec.structs.replace(events[-1], vote=None)]
        for event in events:
            seq = len(history) + 1
            history.append(
                RecordedEvent(seq=seq, subject="cp.acme.task.t1", event=event, recorded_at=T0, command_id=f"c{number}")
            )
    return history


def test_a_sequence_inside_a_recorded_vote_and_decision_shows_the_state_before_both() -> None:
    history = recorded_before_the_vote_moved()
    assert [type(item.event) for item in history[-2:]] == [ApprovalVoteCast, ApprovalDecided]
    asked, last = state_at(history, 4)
    assert (asked.status, last) == ("awaiting_approval", 3)
    assert asked.approvals[0].decisions == ()
    decided, last = state_at(history, 5)
    assert (decided.status, last) == ("pending", 5)
    assert [vote.by for vote in decided.approvals[0].decisions] == [APPROVER.id]


def test_a_fork_inside_a_recorded_vote_and_decision_stops_before_both() -> None:
    plan = plan_fork(recorded_before_the_vote_moved(), task_id="f1", at_seq=4)
    assert plan.seq == 3
    assert plan.state.status == "awaiting_approval"
    assert [type(event) for event in plan.events] == [TaskSubmitted, TaskClaimed, ApprovalRequested]
