"""Health, readiness, metrics, stats, and the API's own description."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from core.domain.commands import RegisterWorker
from gateway import bodies
from gateway.http import json, principal, services
from gateway.problems import problem_response
from projections.projector import Projector


async def healthz(request: Request) -> Response:
    return json({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    checks: dict[str, str] = {}
    if not svc.store.nc.is_connected:
        checks["nats"] = "not connected"
    try:
        async with asyncio.timeout(2):
            await svc.read_model.ping()
    except Exception as exc:
        checks["postgres"] = f"unreachable: {exc!r}"
    try:
        lag = await projection_lag(request)
    except Exception as exc:
        checks["projections"] = f"unreachable: {exc!r}"
        lag = {}
    if checks:
        return problem_response(503, "not ready: " + "; ".join(f"{k} {v}" for k, v in checks.items()))
    gate = svc.submit_gate
    policy = {"engine": gate.engine.name, "bundle_digest": gate.bundle.digest}
    return json({"status": "ready", "projection_lag": lag, "policy": policy})


async def projection_lag(request: Request) -> dict[str, int]:
    """Events in the log that each projection has not folded yet."""
    svc = services(request)
    return await Projector(svc.read_model.pool, svc.store.nc).lag()


async def stats(request: Request) -> Response:
    who = await principal(request, "read")
    summary = await services(request).read_model.stats(who.org)
    return json({**summary, "projection_lag": await projection_lag(request)})


async def metrics(request: Request) -> Response:
    svc = services(request)
    try:
        for name, lag in (await projection_lag(request)).items():
            svc.metrics.projection_lag.labels(projection=name).set(lag)
    except Exception:  # metrics stay available while NATS is not
        pass
    await svc.metrics.queues.refresh(svc.read_model)  # cached: at most one query per few seconds
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- OpenAPI --------------------------------------------------------------------------------------

_OPERATIONS: list[tuple[str, str, str, str, type | None, str]] = [
    # method, path, summary, permission, body, success
    ("post", "/v1/tasks", "Submit a task", "submit", bodies.SubmitTaskBody, "201"),
    ("get", "/v1/tasks", "List tasks (status, queue, priority, limit, cursor, min_seq)", "read", None, "200"),
    ("get", "/v1/tasks/{task_id}", "Get a task", "read", None, "200"),
    (
        "post",
        "/v1/tasks/claim",
        "Claim the next matching task (long-poll with block_ms)",
        "claim",
        bodies.ClaimBody,
        "200",
    ),
    (
        "post",
        "/v1/tasks/claim-batch",
        "Claim up to max_tasks matching tasks at once: {items: [{task, lease}], seq}",
        "claim",
        bodies.ClaimBatchBody,
        "200",
    ),
    ("post", "/v1/tasks/{task_id}/heartbeat", "Renew a lease", "lease", bodies.HeartbeatBody, "200"),
    (
        "post",
        "/v1/tasks/{task_id}/approval-requests",
        "Ask a human; releases the lease",
        "lease",
        bodies.ApprovalRequestBody,
        "201",
    ),
    ("post", "/v1/tasks/{task_id}/complete", "Complete a task", "lease", bodies.CompleteBody, "200"),
    (
        "post",
        "/v1/tasks/{task_id}/fail",
        "Fail a task (retry with backoff if retryable)",
        "lease",
        bodies.FailBody,
        "200",
    ),
    ("post", "/v1/tasks/{task_id}/cancel", "Cancel a task", "cancel", bodies.CancelBody, "200"),
    (
        "post",
        "/v1/tasks/{task_id}/operations",
        "Record a workflow operation at the next journal index",
        "lease",
        bodies.OperationBody,
        "201",
    ),
    (
        "post",
        "/v1/tasks/{task_id}/sleep",
        "Start a durable sleep; releases the lease",
        "lease",
        bodies.SleepBody,
        "200",
    ),
    (
        "post",
        "/v1/tasks/{task_id}/non-determinism",
        "Report a replay divergence; parks the task",
        "lease",
        bodies.NonDeterminismBody,
        "200",
    ),
    ("post", "/v1/tasks/{task_id}/resume", "Un-park a task after fixing its workflow", "admin", None, "200"),
    (
        "post",
        "/v1/tasks/{task_id}/signals",
        "Send the task's workflow a named signal: {seq}; 409 if the task is terminal",
        "admin, submitter or approver",
        bodies.SignalBody,
        "202",
    ),
    (
        "post",
        "/v1/tasks/{task_id}/signal-waits",
        "Wait for a signal at the next journal index: a kept one is taken at once, else the lease is released",
        "lease",
        bodies.SignalWaitBody,
        "200",
    ),
    ("get", "/v1/tasks/{task_id}/events", "Server-sent events of one task", "read", None, "200"),
    ("get", "/v1/events", "Server-sent events of the org (types, queue)", "read", None, "200"),
    ("get", "/v1/approvals", "List approvals (status, task_id)", "read", None, "200"),
    ("get", "/v1/approvals/{approval_id}", "Get an approval", "read", None, "200"),
    ("post", "/v1/approvals/{approval_id}/approve", "Approve", "decide", bodies.ApproveBody, "200"),
    ("post", "/v1/approvals/{approval_id}/reject", "Reject", "decide", bodies.RejectBody, "200"),
    ("post", "/v1/workers", "Register a worker", "workers", RegisterWorker, "201"),
    ("get", "/v1/workers", "List workers (queue, capability, available)", "read", None, "200"),
    ("get", "/v1/workers/{worker_id}", "Get a worker", "read", None, "200"),
    ("post", "/v1/workers/{worker_id}/heartbeat", "Worker heartbeat", "workers", bodies.WorkerHeartbeatBody, "200"),
    ("delete", "/v1/workers/{worker_id}", "Deregister a worker", "workers", None, "204"),
    ("post", "/v1/workers/{worker_id}/reset", "Close the worker's open circuit breaker now", "admin", None, "200"),
    ("post", "/v1/api-keys", "Create an API key (shown once)", "admin", bodies.CreateApiKeyBody, "201"),
    ("delete", "/v1/api-keys/{key_id}", "Revoke an API key", "admin", None, "204"),
    (
        "post",
        "/v1/policy-bundles",
        "Push a new version of the org's policy bundle (decides later submissions)",
        "admin",
        bodies.PolicyBundleBody,
        "201",
    ),
    ("get", "/v1/policy-bundles", "List the org's policy bundle versions, newest first", "read", None, "200"),
    ("get", "/v1/policy-bundles/{version}", "Get one version (or current) in full", "read", None, "200"),
    (
        "post",
        "/v1/environments",
        "Create an environment holding queues (a queue belongs to at most one); 409 if the name exists",
        "admin",
        bodies.EnvironmentBody,
        "201",
    ),
    ("get", "/v1/environments", "List the org's environments: {items, seq}", "read", None, "200"),
    ("get", "/v1/environments/{name}", "Get an environment", "read", None, "200"),
    (
        "put",
        "/v1/environments/{name}",
        "Create or replace an environment's queues and labels",
        "admin",
        bodies.EnvironmentReplaceBody,
        "200",
    ),
    (
        "delete",
        "/v1/environments/{name}",
        "Delete an environment (its queues then belong to none)",
        "admin",
        None,
        "204",
    ),
    ("get", "/v1/queues", "List the queues that have settings of their own: {items, seq}", "read", None, "200"),
    ("get", "/v1/queues/{name}", "A queue's settings (the defaults when it has none)", "read", None, "200"),
    (
        "put",
        "/v1/queues/{name}",
        "Set a queue's claim strategy (fifo, least_loaded, round_robin, random) and its workers' breaker, whole",
        "admin",
        bodies.QueueSettingsBody,
        "200",
    ),
    (
        "delete",
        "/v1/queues/{name}",
        "Back to the defaults; answers the queue's settings and the seq",
        "admin",
        None,
        "200",
    ),
    (
        "post",
        "/v1/notification-channels",
        "Create a notification channel: slack (url), email (smtp, secret: the SMTP password) or webhook (url,"
        " secret: the Standard Webhooks signing secret); 409 if the name exists",
        "admin",
        bodies.NotificationChannelBody,
        "201",
    ),
    ("get", "/v1/notification-channels", "List the org's notification channels: {items, seq}", "admin", None, "200"),
    ("get", "/v1/notification-channels/{name}", "Get a notification channel (no secrets)", "admin", None, "200"),
    (
        "put",
        "/v1/notification-channels/{name}",
        "Create or replace a notification channel whole",
        "admin",
        bodies.NotificationChannelReplaceBody,
        "200",
    ),
    (
        "delete",
        "/v1/notification-channels/{name}",
        "Delete a notification channel; 409 while rules send to it",
        "admin",
        None,
        "204",
    ),
    (
        "post",
        "/v1/notification-rules",
        "Create a notification rule: send to channel when one of on happens to a task of queue, environment"
        " and workflow (each: any when absent)",
        "admin",
        bodies.NotificationRuleBody,
        "201",
    ),
    ("get", "/v1/notification-rules", "List the org's notification rules: {items, seq}", "admin", None, "200"),
    ("delete", "/v1/notification-rules/{rule_id}", "Delete a notification rule", "admin", None, "204"),
    (
        "post",
        "/v1/schedules",
        "Create a schedule: submit `task` at each time `cron` names in `timezone`; overlap skip, allow or"
        " cancel_previous (admin, submitter); 422 for a bad cron or time zone",
        "schedule",
        bodies.ScheduleBody,
        "201",
    ),
    ("get", "/v1/schedules", "List the org's schedules: {items}", "schedule", None, "200"),
    ("get", "/v1/schedules/{schedule_id}", "Get a schedule", "schedule", None, "200"),
    ("delete", "/v1/schedules/{schedule_id}", "Delete a schedule (no more fires)", "schedule", None, "204"),
    ("post", "/v1/schedules/{schedule_id}/pause", "Pause a schedule", "schedule", None, "200"),
    ("post", "/v1/schedules/{schedule_id}/resume", "Resume from the next cron time", "schedule", None, "200"),
    (
        "post",
        "/v1/schedules/{schedule_id}/trigger",
        "Run a schedule now (its overlap policy applies): the schedule, with last_task_id",
        "schedule",
        None,
        "200",
    ),
    (
        "post",
        "/v1/tasks/{task_id}/secrets/{name}",
        "Read a secret for the task whose lease the caller holds (worker keys only): {name, version, value};"
        " the task's first read pins the version; recorded as SecretRead",
        "lease",
        bodies.SecretReadBody,
        "200",
    ),
    (
        "put",
        "/v1/secrets/{name}",
        "Set a new version of a secret, org-wide or for one environment (write-only): {name, version}",
        "admin",
        bodies.SecretBody,
        "200",
    ),
    ("get", "/v1/secrets", "List the org's secrets: names, scopes and versions, never values", "admin", None, "200"),
    (
        "put",
        "/v1/worker-config",
        "Replace the org's worker configuration, or one environment's (?environment=)",
        "admin",
        bodies.WorkerConfigBody,
        "200",
    ),
    ("get", "/v1/worker-config", "The org's worker configuration, or one environment's", "admin", None, "200"),
    ("get", "/v1/stats", "Counts by status and projection lag", "read", None, "200"),
    (
        "get",
        "/v1/usage",
        "Recorded LLM calls, tokens and cost per UTC day and model (from, to: YYYY-MM-DD, both included,"
        " default the last 30 days; group_by: day,model, a key left out is null; queue, workflow)",
        "read",
        None,
        "200",
    ),
]
_PUBLIC = [
    ("get", "/healthz", "Process is up"),
    ("get", "/readyz", "NATS, PostgreSQL and projections reachable"),
    ("get", "/metrics", "Prometheus metrics"),
    ("get", "/openapi.json", "This document"),
    ("get", "/docs", "Human-readable API reference"),
]
_QUERY = {
    "/v1/tasks": ["status", "queue", "priority", "limit", "cursor", "min_seq", "workflow"],
    "/v1/approvals": ["status", "task_id", "limit", "cursor"],
    "/v1/workers": ["queue", "capability", "available"],
    "/v1/events": ["types", "queue", "after"],
    "/v1/tasks/{task_id}/events": ["after"],
    "/v1/usage": ["from", "to", "group_by", "queue", "workflow", "min_seq"],
    "/v1/schedules": ["min_seq"],
    "/v1/worker-config": ["environment"],
}
_ERRORS = {
    "400": "Malformed body",
    "401": "No or invalid credential",
    "403": "Role not allowed",
    "404": "Unknown object or another org's",
    "409": "State does not allow the command",
    "413": "Body too large",
    "422": "Invalid field values",
    "429": "Rate limited",
    "503": "A dependency is unavailable",
}


def openapi_document() -> dict[str, Any]:
    body_types = [op[4] for op in _OPERATIONS if op[4] is not None]
    schemas, components = msgspec.json.schema_components(body_types, ref_template="#/components/schemas/{name}")
    problem = {"content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, permission, body_type, success in _OPERATIONS:
        operation: dict[str, Any] = {
            "summary": summary,
            "description": f"Needs permission `{permission}`.",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _path_params(path)
            ]
            + [
                {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                for name in (_QUERY.get(path, []) if method in ("get", "put") else [])
            ]
            + [
                {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
                for _ in ([1] if method in ("post", "put") else [])
            ],
            "responses": {
                success: {"description": "Success"},
                **{code: {"description": text, **problem} for code, text in _ERRORS.items()},
            },
        }
        if body_type is not None:
            operation["requestBody"] = {
                "required": body_type not in (bodies.CancelBody, bodies.ApproveBody, bodies.WorkerHeartbeatBody),
                "content": {"application/json": {"schema": schemas[body_types.index(body_type)]}},
            }
        paths.setdefault(path, {})[method] = operation
    for method, path, summary in _PUBLIC:
        paths.setdefault(path, {})[method] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
    components["Problem"] = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
        "required": ["type", "title", "status", "detail"],
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "controlplane",
            "version": "1",
            "description": "Tasks, approvals and workers on an event log.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


async def openapi(request: Request) -> Response:
    return json(request.app.state.openapi)


async def docs(request: Request) -> Response:
    rows = "".join(
        f"<tr><td><code>{method.upper()}</code></td><td><code>{path}</code></td><td>{op.get('summary', '')}</td>"
        f"<td>{op.get('description', '')}</td></tr>"
        for path, operations in request.app.state.openapi["paths"].items()
        for method, op in operations.items()
    )
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>controlplane API</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem}td,th{padding:.3rem .8rem;text-align:left}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body><h1>controlplane API v1</h1>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Errors are application/problem+json. "
        "Send <code>Authorization: Bearer &lt;API key or JWT&gt;</code>.</p>"
        f"<table><tr><th>method</th><th>path</th><th>what</th><th>who</th></tr>{rows}</table></body></html>"
    )
