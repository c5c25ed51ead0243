"""Operations on one task beyond a single command: reading it (or ``NotFound``), asking humans for an
approval (its details and form checked, its id the task's next), sending its workflow a signal (by
role, its payload bounded), and ending an attempt (a completion or a failure, which the worker's
circuit breaker hears of)."""

from __future__ import annotations

from typing import Any

from application.bodies import ApprovalRequestBody
from application.breakers import record_task_outcome
from application.forms import check_details, check_form, check_signal_payload
from application.principal import Principal
from core.domain.approvals import Approval
from core.domain.commands import Actor, CompleteTask, FailTask, RequestApproval, SignalTask
from core.domain.errors import NotFound, NotPermitted
from core.domain.events import ApprovalRequested
from core.domain.signals import SIGNAL_ROLES
from core.domain.task import Task
from core.log.handler import CommandHandler, Outcome


async def load_task(handler: CommandHandler, org: str, task_id: str) -> tuple[Task, int]:
    """The task as the log holds it now, and its stream sequence; ``NotFound`` if the org has none."""
    task, seq = await handler.load(org, "task", task_id)
    if task is None:
        raise NotFound(f"task {task_id} not found")
    return task, seq


async def request_approval(
    handler: CommandHandler,
    who: Principal,
    task_id: str,
    spec: ApprovalRequestBody,
    *,
    command_id: str | None,
) -> tuple[Approval, int]:
    """Ask for an approval on the task (``who`` must be allowed lease-bound calls; the task decides
    whether the lease is theirs): the approval as requested and the stream sequence. ``InvalidCommand``
    for details too large or a form that is no JSON Schema."""
    who.require("lease")
    check_details(spec.details)
    check_form(spec.form)
    command = RequestApproval(  # the task names the approval: its next id, on the state it decides on
        task_id=task_id,
        worker_id=spec.worker_id,
        lease_id=spec.lease_id,
        reason=spec.reason,
        approvers=spec.approvers,
        quorum=spec.quorum,
        timeout_seconds=spec.timeout_seconds,
        escalation=spec.escalation,
        journal_index=spec.journal_index,
        details=spec.details,
        form=spec.form,
        kind=spec.kind,
    )
    outcome = await handler.handle(who.org, command, actor=who.actor, command_id=command_id)
    requested = next(r.event for r in outcome.events if isinstance(r.event, ApprovalRequested))
    return outcome.state.approval(requested.approval_id), outcome.seq


def require_signaller(actor: Actor) -> None:
    """``NotPermitted`` unless the actor's roles may send signals (admin, submitter, approver)."""
    if not actor.roles & SIGNAL_ROLES:
        raise NotPermitted(
            f"this credential (roles {sorted(actor.roles)}) may not signal: needs {sorted(SIGNAL_ROLES)}"
        )


async def signal(
    handler: CommandHandler, who: Principal, task_id: str, name: str, payload: Any, *, command_id: str | None
) -> Outcome:
    """Send the task's workflow the signal ``name``: a waiting workflow gets it, otherwise the task keeps
    it for the first wait of that name. Admin, submitter and approver may (``NotPermitted`` otherwise);
    ``InvalidCommand`` for a payload too large."""
    require_signaller(who.actor)
    check_signal_payload(payload)
    command = SignalTask(task_id=task_id, name=name, payload=payload)
    return await handler.handle(who.org, command, actor=who.actor, command_id=command_id)


async def end_attempt(
    handler: CommandHandler, who: Principal, command: CompleteTask | FailTask, *, command_id: str | None
) -> Outcome:
    """Complete or fail the task under the lease the command names; then the worker's circuit breaker
    hears how its attempt ended (a completion, or a failure the task will not retry)."""
    who.require("lease")
    outcome = await handler.handle(who.org, command, actor=who.actor, command_id=command_id)
    await record_task_outcome(handler, who.org, command.task_id, outcome)
    return outcome
