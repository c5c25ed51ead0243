"""The org at a glance: its workers, its LLM usage, its policy bundle versions."""

from __future__ import annotations

from datetime import UTC

from starlette.requests import Request
from starlette.responses import Response

from core.domain.policy_set import POLICY_AGGREGATE, POLICY_SET_ID, PolicySet
from gateway.console.web import SignedIn, console_page, render
from gateway.http import services
from gateway.policy_bundles import bundle_summary
from gateway.usage import usage_query

WORKER_LIVE_TYPES = (
    "WorkerRegistered",
    "WorkerHeartbeat",
    "WorkerHeartbeatMissed",
    "WorkerFailed",
    "WorkerDeregistered",
    "TaskClaimed",
    "TaskCompleted",
    "TaskFailed",
    "TaskRetryScheduled",
    "TaskLeaseExpired",
    "TaskLeaseReleased",
    "ApprovalRequested",
    "WorkflowSleepStarted",
    "SignalWaitStarted",
)
"""Events that change a worker's row: its own, and those that take or release a task it holds."""


@console_page
async def workers(request: Request, user: SignedIn) -> Response:
    svc = services(request)
    after = await svc.read_model.checkpoint("workers")
    rows = await svc.read_model.list_workers(user.who.org)
    in_hand = await svc.read_model.tasks_in_hand(user.who.org)
    return render(
        request,
        "workers_table.html" if request.query_params.get("fragment") else "workers.html",
        {
            "workers": [(worker, completed, in_hand.get(worker.id, [])) for worker, completed, _ in rows],
            "after": after,
            "live_types": ",".join(WORKER_LIVE_TYPES),
        },
        user=user,
    )


@console_page
async def policies(request: Request, user: SignedIn) -> Response:
    svc = services(request)
    policy_set, _ = await svc.handler.load(user.who.org, POLICY_AGGREGATE, POLICY_SET_ID)
    assert isinstance(policy_set, PolicySet)
    shipped = svc.submit_gate.bundle
    return render(
        request,
        "policies.html",
        {
            "versions": [bundle_summary(pushed) for pushed in reversed(policy_set.versions)],
            "current": policy_set.current,
            "shipped_digest": shipped.digest,
            "engine": svc.submit_gate.engine.name,
        },
        user=user,
    )


@console_page
async def usage(request: Request, user: SignedIn) -> Response:
    svc = services(request)
    query = usage_query(request.query_params, svc.clock().astimezone(UTC).date())
    items = await svc.read_model.usage(
        user.who.org, start=query.start, end=query.end, queue=query.queue, workflow=query.workflow
    )
    totals = {
        key: sum(item[key] for item in items) for key in ("calls", "prompt_tokens", "completion_tokens", "cost_usd")
    }
    return render(
        request,
        "usage.html",
        {
            "items": items,
            "totals": totals,
            "start": query.start.isoformat(),
            "end": query.end.isoformat(),
            "queue": query.queue,
            "workflow": query.workflow,
        },
        user=user,
    )
