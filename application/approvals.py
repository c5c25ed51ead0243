"""Deciding an approval: the one place a human's decision is made, for the API and the console alike.
An approval's id is ``<task id>-<n>``, so one is read and decided straight from its task's log."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from application.forms import check_response
from application.principal import Principal
from core.domain.approvals import Approval
from core.domain.commands import DecideApproval
from core.domain.errors import InvalidCommand, NotFound
from core.domain.events import Vote
from core.domain.ids import InvalidToken, validate_token
from core.domain.task import Task, task_id_of_approval
from core.log.handler import CommandHandler


async def find_approval(
    handler: CommandHandler, org: str, approval_id: str, *, cached: bool = False
) -> tuple[Task, Approval, int]:
    """The approval, its task and the task's stream sequence, as the log holds them now; ``NotFound``
    for an approval the org does not have (an id that cannot name one included). ``cached``: a copy of
    the task this process already holds will do if the approval is in it (for what never changes once
    requested, such as its form); else the log is read."""
    try:
        task_id = validate_token(task_id_of_approval(approval_id), "task id")
    except InvalidToken:
        raise NotFound(f"approval {approval_id!r} not found") from None
    task, seq = await handler.load(org, "task", task_id, max_age=math.inf if cached else 0.0)
    if cached and (task is None or task.approval(approval_id) is None):
        task, seq = await handler.load(org, "task", task_id)
    approval = task.approval(approval_id) if task is not None else None
    if task is None or approval is None:
        raise NotFound(f"approval {approval_id!r} not found")
    return task, approval, seq


async def decide(
    handler: CommandHandler,
    who: Principal,
    approval_id: str,
    decision: Vote,
    *,
    comment: str | None,
    response: Any,
    command_id: str | None,
) -> tuple[Approval, int]:
    """Approve or reject for ``who`` (who must be allowed to decide). Returns the approval as decided
    and the stream sequence. ``NotFound`` for an approval the org does not have, ``InvalidCommand`` for
    a response that does not fit its form (nothing is appended); the domain's own rejections (not an
    approver, already decided, a rejection without a reason) propagate as they are."""
    who.require("decide")
    # The form is the request's, fixed once requested; the vote itself is decided on the log's state.
    task, approval, _ = await find_approval(handler, who.org, approval_id, cached=True)
    check_response(approval.form, response, required=decision == "approve")
    if comment is not None and "\x00" in comment:
        raise InvalidCommand("strings may not contain the NUL character (\\u0000)")
    fields = {"task_id": task.id, "approval_id": approval.id, "decision": decision, "comment": comment}
    try:  # the command type's own bounds hold whoever calls
        command = msgspec.convert({**fields, "response": response}, DecideApproval)
    except msgspec.ValidationError as exc:
        raise InvalidCommand(str(exc)) from None
    outcome = await handler.handle(who.org, command, actor=who.actor, command_id=command_id)
    return outcome.state.approval(approval.id), outcome.seq
