"""The approvals inbox: what waits for a human, what exactly is being approved, and the buttons to
decide it, through the same decision function as ``POST /v1/approvals/{id}/approve``."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from starlette.requests import Request
from starlette.responses import Response

from application.approvals import decide, find_approval
from core.domain.approvals import Approval, why_cannot_vote
from core.domain.events import Vote
from core.domain.task import Task
from gateway.console.forms import FormField, form_fields, posted_response
from gateway.console.web import SignedIn, console_page, done, form_command_id, form_of, relative, render
from gateway.http import path_id, services
from gateway.problems import Problem

INBOX_LIMIT = 500
LIVE_TYPES = (
    "ApprovalRequested",
    "ApprovalVoteCast",
    "ApprovalDecided",
    "ApprovalTimedOut",
    "ApprovalEscalated",
    "TaskCancelled",
    "TaskTimedOut",
    "TaskFailed",
    "TaskCompleted",
)
"""Events that add, change or remove an inbox row."""


@dataclass(frozen=True)
class ApprovalView:
    approval: Approval
    task: Task | None
    refusal: str | None
    """Why this person may not decide it; None when they may."""
    fields: list[FormField] | None
    idempotency_key: str
    """One per rendering: a double-clicked or retried decision is recorded once."""
    time_left: str
    escalation: str | None

    @property
    def may_decide(self) -> bool:
        return self.refusal is None

    @property
    def approvals(self) -> int:
        return sum(1 for vote in self.approval.decisions if vote.decision == "approve")


def approval_view(approval: Approval, task: Task | None, user: SignedIn, now: datetime) -> ApprovalView:
    refusal = why_cannot_vote(approval, user.who.actor)
    if refusal is None and (vote := next((v for v in approval.decisions if v.by == user.who.actor.id), None)):
        refusal = f"you have already voted ({vote.decision}); waiting for others"
    escalation = None
    if approval.escalation is not None:
        targets = ", ".join(approval.escalation.approvers)
        if approval.escalated:
            escalation = f"escalated to {targets}"
        else:
            due = approval.created_at + timedelta(seconds=approval.escalation.after_seconds)
            escalation = f"escalates to {targets} {relative(due, now)}"
    return ApprovalView(
        approval=approval,
        task=task,
        refusal=refusal,
        fields=form_fields(approval.form),
        idempotency_key=secrets.token_urlsafe(16),
        time_left="no time limit" if approval.expires_at is None else f"times out {relative(approval.expires_at, now)}",
        escalation=escalation,
    )


@console_page
async def inbox(request: Request, user: SignedIn) -> Response:
    svc = services(request)
    # The checkpoint first: the page's live feed starts after it, so a request projected after the
    # list was read still arrives as an event.
    after = await svc.read_model.checkpoint("tasks")
    rows, _ = await svc.read_model.list_approvals(user.who.org, status="pending", limit=INBOX_LIMIT)
    tasks = await svc.read_model.tasks_by_id(user.who.org, (approval.task_id for approval, _ in rows))
    now = svc.clock()
    views = [approval_view(a, tasks.get(a.task_id, (None, 0))[0], user, now) for a, _ in rows]
    views.sort(key=lambda view: (not view.may_decide, view.approval.created_at))
    return render(
        request,
        "approvals.html",
        {
            "views": views,
            "after": after,
            "live_types": ",".join(LIVE_TYPES),
            "notice": request.query_params.get("notice"),
        },
        user=user,
    )


@console_page
async def row(request: Request, user: SignedIn) -> Response:
    """One inbox row, fresh from the log, for the live feed; 204 once it no longer belongs in the inbox."""
    task, approval = await _pending(request, user)
    if approval.status != "pending" or task.is_terminal:
        return Response(status_code=204)
    view = approval_view(approval, task, user, services(request).clock())
    return render(request, "approval_row.html", {"view": view}, user=user)


@console_page
async def approve(request: Request, user: SignedIn) -> Response:
    return await _decide(request, user, "approve")


@console_page
async def reject(request: Request, user: SignedIn) -> Response:
    return await _decide(request, user, "reject")


async def _decide(request: Request, user: SignedIn, decision: Vote) -> Response:
    _, approval = await _pending(request, user)
    form = await form_of(request)
    comment = form.get("comment")
    comment = comment.strip() if isinstance(comment, str) and comment.strip() else None
    if decision == "reject" and comment is None:
        raise Problem(422, "a rejection needs a reason: say why in the comment")
    decided, seq = await decide(
        services(request).handler,
        user.who,
        approval.id,
        decision,
        comment=comment,
        response=posted_response(approval.form, form, max_depth=services(request).limits.max_json_depth),
        command_id=form_command_id(user, form, decision, approval.id),
    )
    verb = "approved" if decision == "approve" else "rejected"
    message = f"You {verb} {approval.id}" + ("" if decided.status == "pending" else f"; it is now {decided.status}")
    return done(
        request, "/console/approvals", message, {"approval_id": decided.id, "status": decided.status, "seq": seq}
    )


async def _pending(request: Request, user: SignedIn) -> tuple[Task, Approval]:
    approval_id = path_id(request, "approval_id", "approval")
    task, approval, _ = await find_approval(services(request).handler, user.who.org, approval_id)
    return task, approval
