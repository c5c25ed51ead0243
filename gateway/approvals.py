"""Approval endpoints. An approval's id is ``<task id>-<n>``, so one is read and decided straight from
its task's log; the pending inbox comes from the read model."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core.domain.commands import DecideApproval
from core.domain.events import Vote
from core.domain.ids import validate_token
from core.domain.task import Approval, Task, task_id_of_approval
from gateway.auth import Principal
from gateway.bodies import ApproveBody, RejectBody
from gateway.forms import check_response
from gateway.http import body, command_id, json, principal, query, read_after, services
from gateway.problems import Problem
from gateway.queries import ApprovalList
from gateway.services import Services
from gateway.views import approval_document


async def list_approvals(request: Request) -> Response:
    who = await principal(request, "read")
    asked = query(request, ApprovalList)
    await read_after(request, "tasks", who)
    try:
        rows, cursor = await services(request).read_model.list_approvals(
            who.org, status=asked.status, task_id=asked.task_id, limit=asked.limit, cursor=asked.cursor
        )
    except ValueError as exc:
        raise Problem(422, str(exc)) from exc
    return json({"items": [{**approval_document(a), "seq": seq} for a, seq in rows], "next_cursor": cursor})


async def get_approval(request: Request) -> Response:
    who = await principal(request, "read")
    _, approval, seq = await _approval(services(request), who.org, request.path_params["approval_id"])
    return json({**approval_document(approval), "seq": seq})


async def approve(request: Request) -> Response:
    who = await principal(request, "decide")
    spec = await body(request, ApproveBody, optional=True)
    return await _decided(request, who, "approve", spec.comment, spec.response)


async def reject(request: Request) -> Response:
    who = await principal(request, "decide")
    spec = await body(request, RejectBody)
    return await _decided(request, who, "reject", spec.reason, spec.response)


async def _decided(request: Request, who: Principal, decision: Vote, comment: str | None, response: Any) -> Response:
    approval_id = request.path_params["approval_id"]
    approval, seq = await decide(
        services(request),
        who,
        approval_id,
        decision,
        comment=comment,
        response=response,
        command_id=command_id(request, who, decision, approval_id),
    )
    return json({**approval_document(approval), "seq": seq})


async def decide(
    svc: Services,
    who: Principal,
    approval_id: str,
    decision: Literal["approve", "reject"],
    *,
    comment: str | None,
    response: Any,
    command_id: str | None,
) -> tuple[Approval, int]:
    """Approve or reject: the one place a human's decision is made, for the API routes and the console.
    Returns the approval as decided and the stream sequence. 404 for an approval the org does not
    have, 422 for a response that does not fit its form (nothing is appended); the domain's own
    rejections (403, 409, 422) propagate as typed errors."""
    who.require("decide")
    task, approval, _ = await _approval(svc, who.org, approval_id)
    check_response(approval.form, response, required=decision == "approve")
    if comment is not None and "\x00" in comment:
        raise Problem(422, "strings may not contain the NUL character (\\u0000)")
    fields = {"task_id": task.id, "approval_id": approval.id, "decision": decision, "comment": comment}
    try:  # the command type's own bounds hold whoever calls
        command = msgspec.convert({**fields, "response": response}, DecideApproval)
    except msgspec.ValidationError as exc:
        raise Problem(422, str(exc)) from None
    outcome = await svc.handler.handle(who.org, command, actor=who.actor, command_id=command_id)
    return outcome.state.approval(approval.id), outcome.seq


async def _approval(svc: Services, org: str, approval_id: str) -> tuple[Task, Approval, int]:
    try:
        task_id = validate_token(task_id_of_approval(approval_id), "task id")
    except ValueError:
        raise Problem(404, f"approval {approval_id!r} not found") from None
    task, seq = await svc.handler.load(org, "task", task_id)
    approval = task.approval(approval_id) if task is not None else None
    if task is None or approval is None:
        raise Problem(404, f"approval {approval_id!r} not found")
    return task, approval, seq
