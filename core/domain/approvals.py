"""Approvals: what a task asks of humans (an approval, or a workflow's question ``ctx.ask``) and the rules
of deciding one: who may vote, quorum, a rejection's reason, timeout and escalation.

Each function here looks at one approval; the task aggregate (``core/domain/task.py``) keeps a task's
approvals, checks what the task itself requires (its lease, its status) and applies these. Pure: no
I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from core.domain.commands import Actor, DecideApproval, RequestApproval
from core.domain.decider import DecisionContext, Timer
from core.domain.errors import AlreadyDecided, InvalidCommand, NotPermitted
from core.domain.events import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    ApprovalTimedOut,
    ApprovalVoteCast,
    DecidingVote,
    Escalation,
    Event,
    TaskSubmitted,
)

APPROVER_ROLES = frozenset({"approver", "admin"})
POLICY_GATE = "policy"
"""``requested_by`` of the approval a submit policy requires before anyone may work on the task."""


class ApprovalVote(msgspec.Struct, frozen=True):
    by: str
    decision: str
    comment: str | None
    at: datetime
    response: Any = None


class Approval(msgspec.Struct, frozen=True):
    id: str
    task_id: str
    status: str
    reason: str
    requested_by: str
    requested_by_actor: str
    approvers: tuple[str, ...]
    quorum: int
    decisions: tuple[ApprovalVote, ...]
    created_at: datetime
    expires_at: datetime | None
    decided_at: datetime | None
    escalation: Escalation | None
    escalated: bool = False
    details: Any = None
    """What is being approved (a plan, a diff, a tool call), as the requester attached it."""
    form: dict[str, Any] | None = None
    """A JSON Schema every decision's ``response`` fits (checked by the gateway, not here)."""
    kind: str = "approval"
    """``question`` when a workflow asked a human something (``ctx.ask``), else ``approval``."""


# --- decide ---------------------------------------------------------------------------------------


def requested(command: RequestApproval, ctx: DecisionContext) -> ApprovalRequested:
    """The request, once the task has checked that its lease holder asks: refused when the named
    approvers alone could never reach the quorum."""
    named = {a for a in command.approvers if not a.startswith("role:")}
    if named and len(named) == len(set(command.approvers)) and len(named) < command.quorum:
        raise InvalidCommand(f"quorum {command.quorum} can never be reached by the {len(named)} named approvers")
    assert command.approval_id is not None, "the task names the approval before it is requested"
    return ApprovalRequested(
        at=ctx.now,
        approval_id=command.approval_id,
        lease_id=command.lease_id,
        requested_by=command.worker_id,
        requested_by_actor=ctx.actor.id,
        reason=command.reason,
        approvers=tuple(dict.fromkeys(command.approvers)),
        quorum=command.quorum,
        expires_at=None if command.timeout_seconds is None else ctx.now + timedelta(seconds=command.timeout_seconds),
        escalation=command.escalation,
        journal_index=command.journal_index,
        details=command.details,
        form=command.form,
        kind=command.kind,
    )


def why_cannot_vote(approval: Approval, actor: Actor) -> str | None:
    """Why ``actor`` may not vote on ``approval``, or None when it may (whether it already voted aside):
    the one rule the decider enforces and the console explains instead of showing a button."""
    if actor.id in (approval.requested_by, approval.requested_by_actor):
        return "the worker that requested an approval cannot decide it"
    if not actor.roles & APPROVER_ROLES:
        return "deciding an approval needs the approver or admin role"
    roles = {a.removeprefix("role:") for a in approval.approvers if a.startswith("role:")}
    named = {a for a in approval.approvers if not a.startswith("role:")}
    role_match = bool(roles & actor.roles) or ("admin" in actor.roles and bool(roles))
    if not (role_match or actor.id in named):
        return f"approval {approval.id} may be decided only by {list(approval.approvers)}"
    return None


def vote(approval: Approval, command: DecideApproval, ctx: DecisionContext) -> Sequence[Event]:
    """A vote on a pending approval, and the decision it makes: one rejection rejects, ``quorum``
    distinct approvals approve."""
    if (refusal := why_cannot_vote(approval, ctx.actor)) is not None:
        raise NotPermitted(refusal)
    if any(cast.by == ctx.actor.id for cast in approval.decisions):
        raise AlreadyDecided(f"{ctx.actor.id} has already voted on approval {approval.id}")
    if command.decision == "reject" and not command.comment:
        raise InvalidCommand("a rejection needs a reason")
    approvals_after = sum(1 for v in approval.decisions if v.decision == "approve") + (command.decision == "approve")
    cast = DecidingVote(by=ctx.actor.id, decision=command.decision, comment=command.comment, response=command.response)
    if command.decision == "reject" or approvals_after >= approval.quorum:
        outcome = "rejected" if command.decision == "reject" else "approved"
        return [ApprovalDecided(at=ctx.now, approval_id=approval.id, outcome=outcome, vote=cast)]
    return [ApprovalVoteCast(at=ctx.now, approval_id=approval.id, **msgspec.structs.asdict(cast))]


# --- evolve ---------------------------------------------------------------------------------------


def opened(task_id: str, event: ApprovalRequested) -> Approval:
    return Approval(
        id=event.approval_id,
        task_id=task_id,
        status="pending",
        reason=event.reason,
        requested_by=event.requested_by,
        requested_by_actor=event.requested_by_actor,
        approvers=event.approvers,
        quorum=event.quorum,
        decisions=(),
        created_at=event.at,
        expires_at=event.expires_at,
        decided_at=None,
        escalation=event.escalation,
        details=event.details,
        form=event.form,
        kind=event.kind,
    )


def policy_gate(event: TaskSubmitted) -> Approval:
    """The approval a submit policy that requires one opens with the task: any approver but the
    submitter decides it."""
    assert event.policy is not None
    return Approval(
        id=f"{event.task_id}-1",
        task_id=event.task_id,
        status="pending",
        reason="; ".join(event.policy.reasons) or "the submit policy requires approval",
        requested_by=POLICY_GATE,
        requested_by_actor=event.submitted_by,  # who submitted a risky task cannot wave it through
        approvers=("role:approver",),
        quorum=1,
        decisions=(),
        created_at=event.at,
        expires_at=None,
        decided_at=None,
        escalation=None,
    )


def voted(approval: Approval, event: ApprovalVoteCast | DecidingVote, at: datetime) -> Approval:
    cast = ApprovalVote(by=event.by, decision=event.decision, comment=event.comment, at=at, response=event.response)
    return msgspec.structs.replace(approval, decisions=(*approval.decisions, cast))


def escalated(approval: Approval, event: ApprovalEscalated) -> Approval:
    """The escalation's approvers may decide too, once."""
    if approval.escalated:
        return approval
    approvers = tuple(dict.fromkeys((*approval.approvers, *event.approvers)))
    return msgspec.structs.replace(approval, escalated=True, approvers=approvers)


def closed(approval: Approval, status: str, at: datetime) -> Approval:
    return msgspec.structs.replace(approval, status=status, decided_at=at)


# --- timers ---------------------------------------------------------------------------------------


def approval_timers(approval: Approval) -> list[Timer]:
    """Its timeout and its escalation, while it is pending."""
    if approval.status != "pending":
        return []
    wanted = []
    if approval.expires_at is not None:
        wanted.append(
            Timer(f"approval-{approval.id}-timeout", ApprovalTimedOut(at=approval.expires_at, approval_id=approval.id))
        )
    if approval.escalation is not None and not approval.escalated:
        due = approval.created_at + timedelta(seconds=approval.escalation.after_seconds)
        wanted.append(
            Timer(
                f"approval-{approval.id}-escalation",
                ApprovalEscalated(at=due, approval_id=approval.id, approvers=approval.escalation.approvers),
            )
        )
    return wanted
