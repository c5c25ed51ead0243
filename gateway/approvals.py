"""Approval endpoints. An approval is read and decided from its task's log by the application layer
(``application/approvals.py``, which the console's buttons call too); the pending inbox comes from the
read model."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from application.approvals import decide, find_approval
from application.bodies import ApproveBody, RejectBody
from application.principal import Principal
from core.domain.events import Vote
from gateway.http import body, command_id, json, principal, query, read_after, services
from gateway.problems import Problem
from gateway.queries import ApprovalList
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
    _, approval, seq = await find_approval(services(request).handler, who.org, request.path_params["approval_id"])
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
        services(request).handler,
        who,
        approval_id,
        decision,
        comment=comment,
        response=response,
        command_id=command_id(request, who, decision, approval_id),
    )
    return json({**approval_document(approval), "seq": seq})
