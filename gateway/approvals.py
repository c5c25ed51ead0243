"""Approval endpoints. An approval's id is ``<task id>-<n>``, so one is read and decided straight from
its task's log; the pending inbox comes from the read model."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from core.commands import DecideApproval
from core.ids import validate_token
from core.task import Approval, Task, task_id_of_approval
from gateway.auth import Principal
from gateway.bodies import ApproveBody, RejectBody
from gateway.http import body, command_id, json, limit_param, principal, read_after, services
from gateway.problems import Problem
from gateway.views import approval_document

APPROVAL_STATUSES = {"pending", "approved", "rejected", "timed_out"}


async def list_approvals(request: Request) -> Response:
    who = await principal(request, "read")
    query = request.query_params
    status = query.get("status")
    if status is not None and status not in APPROVAL_STATUSES:
        raise Problem(422, f"status must be one of {sorted(APPROVAL_STATUSES)}")
    await read_after(request, "tasks")
    try:
        rows, cursor = await services(request).read_model.list_approvals(
            who.org,
            status=status,
            task_id=query.get("task_id"),
            limit=limit_param(query.get("limit")),
            cursor=query.get("cursor"),
        )
    except ValueError as exc:
        raise Problem(422, str(exc)) from exc
    return json({"items": [{**approval_document(a), "seq": seq} for a, seq in rows], "next_cursor": cursor})


async def get_approval(request: Request) -> Response:
    who = await principal(request, "read")
    _, approval, seq = await _approval(request, who.org)
    return json({**approval_document(approval), "seq": seq})


async def approve(request: Request) -> Response:
    who = await principal(request, "decide")
    spec = await body(request, ApproveBody, optional=True)
    return await _decide(request, who, "approve", spec.comment)


async def reject(request: Request) -> Response:
    who = await principal(request, "decide")
    spec = await body(request, RejectBody)
    return await _decide(request, who, "reject", spec.reason)


async def _decide(request: Request, who: Principal, decision: str, comment: str | None) -> Response:
    task, approval, _ = await _approval(request, who.org)
    command = DecideApproval(task_id=task.id, approval_id=approval.id, decision=decision, comment=comment)  # type: ignore[arg-type]
    outcome = await services(request).handler.handle(
        who.org, command, actor=who.actor, command_id=command_id(request, who, decision, approval.id)
    )
    decided = outcome.state.approval(approval.id)
    return json({**approval_document(decided), "seq": outcome.seq})


async def _approval(request: Request, org: str) -> tuple[Task, Approval, int]:
    approval_id = request.path_params["approval_id"]
    try:
        task_id = validate_token(task_id_of_approval(approval_id), "task id")
    except ValueError:
        raise Problem(404, f"approval {approval_id!r} not found") from None
    task, seq = await services(request).handler.load(org, "task", task_id)
    approval = task.approval(approval_id) if task is not None else None
    if task is None or approval is None:
        raise Problem(404, f"approval {approval_id!r} not found")
    return task, approval, seq
