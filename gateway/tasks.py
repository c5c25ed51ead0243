"""Task endpoints of docs/api.md. Single tasks are read from the log (the handler's cached fold), so a GET
after a POST always shows the write; lists come from the read model, claim candidates from the
gateway's in-memory claim index (gateway/claims.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core.domain.commands import (
    Actor,
    CancelTask,
    ClaimTask,
    CompleteTask,
    FailTask,
    HeartbeatTask,
    RecordOperation,
    ReportNonDeterminism,
    RequestApproval,
    ResumeTask,
    SignalTask,
    StartSleep,
    SubmitTask,
    WaitForSignal,
)
from core.domain.errors import (
    AlreadyExists,
    AlreadyTerminal,
    CapabilityMismatch,
    CommandIdTaken,
    InvalidTransition,
    NotFound,
    NotReady,
)
from core.domain.events import (
    ApprovalRequested,
    PolicyDecision,
    SignalConsumed,
    TaskSubmissionDenied,
    WorkflowRef,
)
from core.domain.ids import new_id
from core.domain.subjects import aggregate_subject
from core.domain.task import (
    SIGNAL_ROLES,
    Task,
    hosted_workflow_versions,
    next_approval_id,
    workflow_capability,
)
from core.log.handler import Outcome
from gateway.auth import Principal
from gateway.bodies import (
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
from gateway.breakers import open_breaker, record_task_outcome
from gateway.forms import check_details, check_form, check_signal_payload
from gateway.http import (
    body,
    command_id,
    derived_id,
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
from gateway.queues import settings_of
from gateway.services import Services
from gateway.views import approval_document, task_document
from policies_wasm import PolicyError
from projections.read import DATABASE_UNAVAILABLE

CLAIM_CANDIDATES = 16
DEFAULT_QUEUE = "default"
DISCONNECT_CHECK_SECONDS = 1.0
_UNCLAIMABLE = (InvalidTransition, NotReady, CapabilityMismatch, AlreadyTerminal, NotFound)


async def submit(request: Request) -> Response:
    who = await principal(request, "submit")
    spec = await body(request, SubmitTaskBody)
    key = idempotency_key(request)
    task_id = new_id() if key is None else derived_id(who.org, who.credential_id, key, "task")
    fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
    try:
        outcome = await submit_task(
            services(request),
            who.org,
            spec,
            task_id=task_id,
            actor=who.actor,
            command_id=command_id(request, who, "submit", fingerprint),
        )
    except AlreadyExists as exc:
        raise Problem(409, "this Idempotency-Key was already used with a different request body") from exc
    if outcome.state is None:  # the denial is in the log; a retry with the same key gets it again
        raise Problem(403, f"the submit policy denied this task: {'; '.join(denial_reasons(outcome))}")
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id), 201)


def denial_reasons(outcome: Outcome) -> list[str]:
    """Why the submit policy denied a submission whose outcome holds no task."""
    denied = outcome.events[0].event
    return denied.decision.reasons if isinstance(denied, TaskSubmissionDenied) else []


async def submit_task(
    svc: Services, org: str, spec: SubmitTaskBody, *, task_id: str, actor: Actor, command_id: str | None
) -> Outcome:
    """The one submit path, for the API and for schedules: route by the org's environments, ask the
    submit policy, pin the workflow, append. Raises ``Problem`` (422 routing, 503 policy) and the
    handler's ``Rejected``; a denial is an outcome whose state is None."""
    queue, environment = await _route(svc, org, spec)
    decision, policy_version = await _submit_decision(svc, org, spec, queue, environment)
    command = SubmitTask(
        task_id=task_id,
        task_type=spec.type,
        payload=spec.payload,
        queue=queue,
        priority=spec.priority,
        required_capabilities=spec.required_capabilities,
        max_retries=spec.max_retries,
        timeout_seconds=spec.timeout_seconds,
        retry_backoff_seconds=spec.retry_backoff_seconds,
        metadata=spec.metadata,
        workflow=None if spec.workflow is None else await _pinned_workflow(svc, org, spec, queue),
        policy=decision,
        policy_version=policy_version,
        environment=environment,
        excluded_workers=spec.excluded_workers,
    )
    return await svc.handler.handle(org, command, actor=actor, command_id=command_id)


async def _route(svc: Services, org: str, spec: SubmitTaskBody) -> tuple[str, str | None]:
    """The task's queue and that queue's environment, from the org's environments as the log holds them
    now. A submit naming an environment and no queue goes to the environment's first queue; naming
    both, the queue must be one of the environment's. The submitter's metadata plays no part."""
    environments, _ = await svc.environments.current(org)
    if spec.environment is None:
        queue = spec.queue or DEFAULT_QUEUE
        holder = environments.of_queue(queue)
        return queue, None if holder is None else holder.name
    named = environments.get(spec.environment)
    if named is None:
        raise Problem(
            422,
            f"environment {spec.environment} is not defined in this org; GET /v1/environments lists them, "
            "or name a queue instead",
        )
    if spec.queue is None:
        if not named.queues:
            raise Problem(
                422,
                f"environment {named.name} holds no queue to submit to; name a queue, or give the environment one "
                f"(PUT /v1/environments/{named.name})",
            )
        return named.queues[0], named.name
    if spec.queue not in named.queues:
        raise Problem(
            422,
            f"queue {spec.queue} is not in environment {named.name} (its queues: "
            f"{', '.join(named.queues) or 'none'}); name one of those, or leave queue out",
        )
    return spec.queue, named.name


async def _submit_decision(
    svc: Services, org: str, spec: SubmitTaskBody, queue: str, environment: str | None
) -> tuple[PolicyDecision, int | None]:
    try:
        return await svc.submit_gate.decide(org, spec, queue=queue, environment=environment)
    except PolicyError as exc:
        raise Problem(503, f"the submit policy could not decide ({exc}); nothing was submitted") from exc


async def _pinned_workflow(svc: Services, org: str, spec: SubmitTaskBody, queue: str) -> WorkflowRef:
    """A workflow named without a version is pinned to the newest version a live runner on the task's
    queue hosts. Without one (or without the read model) the first claim pins it instead."""
    assert spec.workflow is not None
    name, version = spec.workflow.name, spec.workflow.version
    if version is None:
        try:
            runners = await svc.read_model.list_workers(org, queue=queue, capability=workflow_capability(name, None))
        except DATABASE_UNAVAILABLE:  # submitting needs only the log
            runners = []
        hosted = [
            hosted_workflow_versions(worker.capabilities).get(name, set())
            for worker, _, _ in runners
            if worker.status not in ("offline", "failed")
        ]
        version = max(set().union(*hosted), default=None)
    return WorkflowRef(name, version)


async def get_task(request: Request) -> Response:
    who = await principal(request, "read")
    asked = query(request, TaskRead)
    if asked.wait_seconds:
        task, seq = await _when_terminal(request, who.org, asked.wait_seconds)
    else:
        task, seq = await _task(request, who.org)
    return json(task_document(task, seq, viewer=who.actor.id))


async def _when_terminal(request: Request, org: str, seconds: int) -> tuple[Task, int]:
    """The task once it is terminal, or at the deadline as it is then (or when the client left). Woken
    by the task's own subject, which every append to it reaches; re-read at least every second anyway,
    so a wake-up that came before its event was readable cannot make the answer wait for the deadline."""
    task_id = path_id(request, "task_id", "task")
    changed = asyncio.Event()

    async def wake(_: Any) -> None:
        changed.set()

    subscription = await services(request).store.nc.subscribe(aggregate_subject(org, "task", task_id), cb=wake)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            changed.clear()
            task, seq = await _task(request, org)
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
    [(document, lease, seq, trace)] = claimed
    return json({"task": document, "lease": lease, "seq": seq, "trace": trace})


async def claim_batch(request: Request) -> Response:
    """Up to ``max_tasks`` claims in one request: a runner with many free slots (one that took over
    from a crashed runner, say) resumes them all at once instead of one round trip each."""
    who = await principal(request, "claim")
    spec = await body(request, ClaimBatchBody)
    claimed = await _claim(request, who, spec, max_tasks=spec.max_tasks)
    if not claimed:
        return Response(status_code=204)
    items = [{"task": document, "lease": lease, "trace": trace} for document, lease, _, trace in claimed]
    return json({"items": items, "seq": max(seq for _, _, seq, _ in claimed)})


Claimed = tuple[dict[str, Any], dict[str, Any], int, dict[str, str | None]]
"""A claimed task's document, its lease, the claim's stream sequence, and its ``trace``: the correlation id
and ``traceparent`` of its submit, which the runner sends on with every call for the task (so its events
carry the submit's correlation id, and its spans join the submit's trace)."""


async def _claim(request: Request, who: Principal, spec: ClaimBody, *, max_tasks: int) -> list[Claimed]:
    """Claims in claim order, returned as soon as at least one succeeded, or empty after ``block_ms``.
    With an Idempotency-Key each lease id is derived from it, and a retry returns the original claims."""
    svc = services(request)
    key = idempotency_key(request)
    lease_ids = [
        new_id() if key is None else derived_id(who.org, who.credential_id, key, "claim" if i == 0 else f"claim-{i}")
        for i in range(max_tasks)
    ]
    taken: set[str] = set()

    async def attempt(task_id: str, lease_id: str) -> Claimed | None:
        command = ClaimTask(
            task_id=task_id,
            worker_id=spec.worker_id,
            lease_id=lease_id,
            queue=spec.queue,
            capabilities=spec.capabilities,
            lease_seconds=spec.lease_seconds,
        )
        svc.claims_in_flight.add(task_id)
        try:
            outcome = await svc.handler.handle(who.org, command, actor=who.actor, command_id=lease_id)
        except _UNCLAIMABLE:
            return None
        except CommandIdTaken:
            # A retried request whose first try claimed another task with this lease id, and whose
            # answer was lost before the claim was remembered: that lease expires unrenewed.
            taken.add(lease_id)
            return None
        finally:
            svc.claims_in_flight.discard(task_id)
        if key is not None:
            await svc.idempotency.remember(lease_id, task_id)
        claimed = next(r for r in outcome.events if getattr(r.event, "lease_id", None) == lease_id)
        lease = {"id": lease_id, "expires_at": claimed.event.lease_expires_at}  # type: ignore[union-attr]
        origin = await svc.handler.origin(who.org, "task", task_id)  # cached: the claim just read the task
        trace = {
            "correlation_id": None if origin is None else origin.correlation_id,
            "traceparent": None if origin is None else origin.traceparent,
        }
        return task_document(outcome.state, outcome.seq, viewer=who.actor.id), lease, outcome.seq, trace

    if key is not None:
        recalled = await asyncio.gather(*(svc.idempotency.recall(lease_id) for lease_id in lease_ids))
        replayed = [
            await attempt(task_id, lease_id) for task_id, lease_id in zip(recalled, lease_ids, strict=True) if task_id
        ]
        if replayed:
            return [claim for claim in replayed if claim is not None]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(spec.block_ms, svc.limits.max_block_ms) / 1000
    if await open_breaker(svc.handler, who.org, spec.worker_id, svc.clock()) is not None:
        # Its circuit breaker is open: offered nothing (204 after block_ms, so a runner does not spin).
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        return []
    capabilities = list(spec.capabilities)
    claimed: list[Claimed] = []
    unused = list(lease_ids)
    while unused:
        if await request.is_disconnected():
            # Nobody would receive the leases: claiming now would strand the tasks until they expired.
            return []
        wanted = max_tasks - len(claimed)
        candidates = svc.claim_index.candidates(
            who.org,
            spec.queue,
            capabilities,
            svc.clock(),
            max(CLAIM_CANDIDATES, 2 * wanted),
            workflows_only=spec.workflows_only,
            worker_id=spec.worker_id,
        )
        # Racing another claimer of this gateway for the same task would only lose: try the others first.
        ordered = sorted(candidates, key=svc.claims_in_flight.__contains__)
        while ordered and len(claimed) < max_tasks:
            # A batch tries as many candidates at once as it still wants (each on its own task's subject),
            # so a runner taking back many tasks pays one round of appends, not one per task.
            tries, ordered = ordered[: max_tasks - len(claimed)], ordered[max_tasks - len(claimed) :]
            leases = unused[: len(tries)]
            for lease_id, won in zip(leases, await asyncio.gather(*map(attempt, tries, leases)), strict=True):
                if won is not None:
                    claimed.append(won)
                if won is not None or lease_id in taken:
                    unused.remove(lease_id)
            if not unused:
                break
        remaining = deadline - loop.time()
        if claimed or remaining <= 0:
            return claimed
        # Woken when a task on this queue opens up, and at least every second to notice a client that
        # went away or a backoff that ran out.
        await svc.claim_index.wait(
            who.org,
            spec.queue,
            min(remaining, DISCONNECT_CHECK_SECONDS),
            worker_id=spec.worker_id,
            capabilities=capabilities,
            workflows_only=spec.workflows_only,
            strategy=(await settings_of(svc.handler, who.org, spec.queue)).strategy,
        )
    return claimed  # every lease id this request may use named another claim


async def heartbeat(request: Request) -> Response:
    _, outcome = await _path_command(request, "lease", HeartbeatBody, HeartbeatTask, "heartbeat")
    lease = outcome.state.lease
    return json({"lease": {"id": lease.id, "expires_at": lease.expires_at} if lease else None, "seq": outcome.seq})


async def request_approval(request: Request) -> Response:
    who = await principal(request, "lease")
    spec = await body(request, ApprovalRequestBody)
    check_details(spec.details)
    check_form(spec.form)
    task, _ = await _task(request, who.org)
    command = RequestApproval(
        task_id=task.id,
        worker_id=spec.worker_id,
        lease_id=spec.lease_id,
        approval_id=next_approval_id(task),
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
    outcome = await _handle(request, who, command, "approval")
    requested = next(r.event for r in outcome.events if isinstance(r.event, ApprovalRequested))
    approval = outcome.state.approval(requested.approval_id)
    return json({**approval_document(approval), "seq": outcome.seq}, 201)


async def complete(request: Request) -> Response:
    who, outcome = await _path_command(request, "lease", CompleteBody, CompleteTask, "complete")
    await record_task_outcome(services(request).handler, who.org, outcome.state.id, outcome)
    return json(task_document(outcome.state, outcome.seq, viewer=who.actor.id))


async def fail(request: Request) -> Response:
    who, outcome = await _path_command(request, "lease", FailBody, FailTask, "fail")
    await record_task_outcome(services(request).handler, who.org, outcome.state.id, outcome)
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
    if not who.actor.roles & SIGNAL_ROLES:
        raise Problem(
            403, f"this credential (roles {sorted(who.actor.roles)}) may not signal: needs {sorted(SIGNAL_ROLES)}"
        )
    spec = await body(request, SignalBody)
    check_signal_payload(spec.payload)
    command = SignalTask(task_id=path_id(request, "task_id", "task"), name=spec.name, payload=spec.payload)
    outcome = await _handle(request, who, command, "signal")
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
    """A command on the task in the path whose fields are exactly the body's, and who sent it (the
    command's actor: a lease-bound command is accepted only from the credential that claimed)."""
    who = await principal(request, permission)
    spec = await body(request, body_type, optional=optional)
    command = command_type(task_id=path_id(request, "task_id", "task"), **msgspec.structs.asdict(spec))
    return who, await _handle(request, who, command, scope)


async def _handle(request: Request, who: Any, command: Any, scope: str) -> Any:
    return await services(request).handler.handle(
        who.org, command, actor=who.actor, command_id=command_id(request, who, scope, command.task_id)
    )


async def _task(request: Request, org: str) -> tuple[Task, int]:
    task_id = path_id(request, "task_id", "task")
    task, seq = await services(request).handler.load(org, "task", task_id)
    if task is None:
        raise Problem(404, f"task {task_id} not found")
    return task, seq
