"""Task endpoints of docs/api.md: each parses its request, calls the application layer's operation
(``application/submit.py``, ``application/claim.py``, ``application/tasks.py``) or the command handler
for a command that is its body, and renders the answer. Single tasks are read from the log (the
handler's cached fold), so a GET after a POST always shows the write; lists come from the read model."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from application import tasks as task_operations
from application.bodies import (
    ApprovalRequestBody,
    CancelBody,
    ClaimBatchBody,
    ClaimBody,
    CompleteBody,
    FailBody,
    HeartbeatBody,
    NoBody,
    NonDeterminismBody,
    OperationBody,
    SignalBody,
    SignalWaitBody,
    SleepBody,
    SubmitTaskBody,
)
from application.claim import Claim, claim_tasks
from application.idempotency import derived_id
from application.principal import Principal
from application.submit import denial_reasons
from core.domain.commands import (
    CancelTask,
    CompleteTask,
    FailTask,
    HeartbeatTask,
    RecordOperation,
    ReportNonDeterminism,
    ResumeTask,
    StartSleep,
    WaitForSignal,
)
from core.domain.errors import AlreadyExists
from core.domain.events import SignalConsumed
from core.domain.ids import new_id
from core.domain.subjects import aggregate_subject
from core.domain.task import Task
from gateway.http import (
    body,
    command_id,
    handled,
    idempotency_key,
    json,
    path_id,
    principal,
    query,
    read_after,
    services,
)
from gateway.problems import Problem
from gateway.queries import TaskList, TaskRead
from gateway.views import approval_document, task_document

DISCONNECT_CHECK_SECONDS = 1.0


async def submit(request: Request) -> Response:
    who = await principal(request, "submit")
    spec = await body(request, SubmitTaskBody)
    key = idempotency_key(request)
    task_id = new_id() if key is None else derived_id(who.org, who.credential_id, key, "task")
    fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
    svc = services(request)
    try:
        outcome = await svc.submit_path.submit(
            who.org, spec, task_id=task_id, actor=who.actor, command_id=command_id(request, who, "submit", fingerprint)
        )
    except AlreadyExists as exc:
        raise Problem(409, "this Idempotency-Key was already used with a different request body") from exc
    if outcome.state is None:  # the denial is in the log; a retry with the same key gets it again
        raise Problem(403, f"the submit policy denied this task: {'; '.join(denial_reasons(outcome))}")
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id), 201)


async def get_task(request: Request) -> Response:
    who = await principal(request, "read")
    asked = query(request, TaskRead)
    task_id = path_id(request, "task_id", "task")
    if asked.wait_seconds:
        task, seq = await _when_terminal(request, who.org, task_id, asked.wait_seconds)
    else:
        task, seq = await task_operations.load_task(services(request).handler, who.org, task_id)
    return json(task_document(task, seq, viewer=who.actor.id))


async def _when_terminal(request: Request, org: str, task_id: str, seconds: int) -> tuple[Task, int]:
    """The task once it is terminal, or at the deadline as it is then (or when the client left). Woken
    by the task's own subject, which every append to it reaches; re-read at least every second anyway,
    so a wake-up that came before its event was readable cannot make the answer wait for the deadline."""
    svc = services(request)
    changed = asyncio.Event()

    async def wake(_: Any) -> None:
        changed.set()

    subscription = await svc.store.nc.subscribe(aggregate_subject(org, "task", task_id), cb=wake)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            changed.clear()
            task, seq = await task_operations.load_task(svc.handler, org, task_id)
            remaining = deadline - loop.time()
            if task.is_terminal or remaining <= 0 or await request.is_disconnected():
                return task, seq
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, DISCONNECT_CHECK_SECONDS))
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def list_tasks(request: Request) -> Response:
    who = await principal(request, "read")
    asked = query(request, TaskList)
    svc = services(request)
    await read_after(request, "tasks", who)
    try:
        rows, cursor = await svc.read_model.list_tasks(
            who.org,
            status=asked.status,
            queue=asked.queue,
            priority=asked.priority,
            limit=asked.limit,
            cursor=asked.cursor,
            workflow=asked.workflow,
        )
    except ValueError as exc:
        raise Problem(422, str(exc)) from exc
    items = [task_document(task, seq, viewer=who.actor.id) for task, seq in rows]
    return json({"items": items, "next_cursor": cursor})


async def claim(request: Request) -> Response:
    who = await principal(request, "claim")
    spec = await body(request, ClaimBody)
    claimed = await _claim(request, who, spec, max_tasks=1)
    if not claimed:
        return Response(status_code=204)
    [won] = claimed
    return json({"task": _claimed_task(won, who), "lease": _lease(won), "seq": won.seq, "trace": _trace(won)})


async def claim_batch(request: Request) -> Response:
    """Up to ``max_tasks`` claims in one request: a runner with many free slots (one that took over
    from a crashed runner, say) resumes them all at once instead of one round trip each."""
    who = await principal(request, "claim")
    spec = await body(request, ClaimBatchBody)
    claimed = await _claim(request, who, spec, max_tasks=spec.max_tasks)
    if not claimed:
        return Response(status_code=204)
    items = [{"task": _claimed_task(won, who), "lease": _lease(won), "trace": _trace(won)} for won in claimed]
    return json({"items": items, "seq": max(won.seq for won in claimed)})


async def _claim(request: Request, who: Principal, spec: ClaimBody, *, max_tasks: int) -> list[Claim]:
    svc = services(request)
    return await claim_tasks(
        svc.handler,
        svc.claim_index,
        svc.idempotency,
        who,
        spec,
        max_tasks=max_tasks,
        block_seconds=min(spec.block_ms, svc.limits.max_block_ms) / 1000,
        key=idempotency_key(request),
        clock=svc.clock,
        gone=request.is_disconnected,
    )


def _claimed_task(won: Claim, who: Principal) -> dict[str, Any]:
    return task_document(won.task, won.seq, viewer=who.actor.id)


def _lease(won: Claim) -> dict[str, Any]:
    return {"id": won.lease_id, "expires_at": won.lease_expires_at}


def _trace(won: Claim) -> dict[str, str | None]:
    """The correlation id and ``traceparent`` of the task's submit, which the runner sends on with every
    call for the task."""
    return {"correlation_id": won.correlation_id, "traceparent": won.traceparent}


async def heartbeat(request: Request) -> Response:
    _, outcome = await _path_command(request, "lease", HeartbeatBody, HeartbeatTask, "heartbeat")
    lease = outcome.state.lease
    return json({"lease": {"id": lease.id, "expires_at": lease.expires_at} if lease else None, "seq": outcome.seq})


async def request_approval(request: Request) -> Response:
    who = await principal(request, "lease")
    spec = await body(request, ApprovalRequestBody)
    task_id = path_id(request, "task_id", "task")
    approval, seq = await task_operations.request_approval(
        services(request).handler, who, task_id, spec, command_id=command_id(request, who, "approval", task_id)
    )
    return json({**approval_document(approval), "seq": seq}, 201)


async def complete(request: Request) -> Response:
    return await _end_attempt(request, CompleteBody, CompleteTask, "complete")


async def fail(request: Request) -> Response:
    return await _end_attempt(request, FailBody, FailTask, "fail")


async def _end_attempt(request: Request, body_type: type, command_type: type, scope: str) -> Response:
    who, command = await _path_command_of(request, "lease", body_type, command_type)
    outcome = await task_operations.end_attempt(
        services(request).handler, who, command, command_id=command_id(request, who, scope, command.task_id)
    )
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id))


async def cancel(request: Request) -> Response:
    who, outcome = await _path_command(request, "cancel", CancelBody, CancelTask, "cancel", optional=True)
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id))


async def record_operation(request: Request) -> Response:
    _, outcome = await _path_command(request, "lease", OperationBody, RecordOperation, "operation")
    return json({"index": outcome.events[0].event.index, "seq": outcome.seq}, 201)


async def sleep(request: Request) -> Response:
    who, outcome = await _path_command(request, "lease", SleepBody, StartSleep, "sleep")
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id))


async def signal(request: Request) -> Response:
    """Send the task's workflow a named signal: 202 ``{seq}``. Admin, submitter and approver may; a
    waiting workflow gets it, otherwise the task keeps it for the first wait of that name."""
    who = await principal(request, "read")
    task_operations.require_signaller(who.actor)  # before the body is read, as a role refusal always is
    spec = await body(request, SignalBody)
    task_id = path_id(request, "task_id", "task")
    outcome = await task_operations.signal(
        services(request).handler,
        who,
        task_id,
        spec.name,
        spec.payload,
        command_id=command_id(request, who, "signal", task_id),
    )
    return json({"seq": outcome.seq}, 202)


async def wait_for_signal(request: Request) -> Response:
    """The workflow's ``wait_for_signal`` at journal position ``index``: ``{waiting: false, signal}``
    when a kept signal was taken at once (the lease stays), else ``{waiting: true, signal: null}`` and
    the lease is released until a signal of the name arrives or the timeout passes."""
    _, outcome = await _path_command(request, "lease", SignalWaitBody, WaitForSignal, "signal-wait")
    consumed = next((r.event for r in outcome.events if isinstance(r.event, SignalConsumed)), None)
    if consumed is None:
        return json({"index": outcome.events[0].event.index, "waiting": True, "signal": None, "seq": outcome.seq})
    entry = outcome.state.journal[consumed.index]
    return json({"index": consumed.index, "waiting": False, "signal": entry.result, "seq": outcome.seq})


async def report_non_determinism(request: Request) -> Response:
    who, outcome = await _path_command(request, "lease", NonDeterminismBody, ReportNonDeterminism, "non-determinism")
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id))


async def resume(request: Request) -> Response:
    who, outcome = await _path_command(request, "admin", NoBody, ResumeTask, "resume", optional=True)
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id))


async def _path_command(
    request: Request, permission: str, body_type: type, command_type: type, scope: str, *, optional: bool = False
) -> tuple[Principal, Any]:
    """A command on the task in the path whose fields are exactly the body's, handled, and who sent it
    (the command's actor: a lease-bound command is accepted only from the credential that claimed)."""
    who, command = await _path_command_of(request, permission, body_type, command_type, optional=optional)
    outcome = await handled(request, who, command, scope, command.task_id)
    return who, outcome


async def _path_command_of(
    request: Request, permission: str, body_type: type, command_type: type, *, optional: bool = False
) -> tuple[Principal, Any]:
    """Who sends the command on the task in the path whose fields are exactly the body's, and the command."""
    who = await principal(request, permission)
    spec = await body(request, body_type, optional=optional)
    return who, command_type(task_id=path_id(request, "task_id", "task"), **msgspec.structs.asdict(spec))
