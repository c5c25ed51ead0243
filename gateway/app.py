"""The gateway's wiring, in one place: routes, middleware, error handlers."""

from __future__ import annotations

import logging
import time

import msgspec
import nats.errors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.domain.commands import RegisterWorker
from core.domain.errors import Rejected
from core.domain.ids import InvalidToken
from core.log.event_store import StoreError
from gateway import (
    approvals,
    bodies,
    breakers,
    environments,
    keys,
    notifications,
    openapi,
    policy_bundles,
    queues,
    schedules,
    secrets,
    streams,
    system,
    tasks,
    usage,
    worker_config,
    workers,
)
from gateway.console import routes as console_routes
from gateway.observe import RequestTelemetry
from gateway.openapi import PUBLIC, ApiRoute, openapi_document
from gateway.problems import Problem, handle_problem, problem_response
from gateway.services import Services
from projections.read import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)


ROUTES: list[BaseRoute] = [
    ApiRoute(
        "POST", "/v1/tasks", tasks.submit, "Submit a task", permission="submit", body=bodies.SubmitTaskBody, success=201
    ),
    ApiRoute(
        "GET",
        "/v1/tasks",
        tasks.list_tasks,
        "List tasks (status, queue, priority, limit, cursor, min_seq)",
        permission="read",
        query=("status", "queue", "priority", "limit", "cursor", "min_seq", "workflow"),
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/claim",
        tasks.claim,
        "Claim the next matching task (long-poll with block_ms)",
        permission="claim",
        body=bodies.ClaimBody,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/claim-batch",
        tasks.claim_batch,
        "Claim up to max_tasks matching tasks at once: {items: [{task, lease}], seq}",
        permission="claim",
        body=bodies.ClaimBatchBody,
    ),
    ApiRoute("GET", "/v1/tasks/{task_id}", tasks.get_task, "Get a task", permission="read"),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/heartbeat",
        tasks.heartbeat,
        "Renew a lease",
        permission="lease",
        body=bodies.HeartbeatBody,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/approval-requests",
        tasks.request_approval,
        "Ask a human; releases the lease",
        permission="lease",
        body=bodies.ApprovalRequestBody,
        success=201,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/complete",
        tasks.complete,
        "Complete a task",
        permission="lease",
        body=bodies.CompleteBody,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/fail",
        tasks.fail,
        "Fail a task (retry with backoff if retryable)",
        permission="lease",
        body=bodies.FailBody,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/cancel",
        tasks.cancel,
        "Cancel a task",
        permission="cancel",
        body=bodies.CancelBody,
        body_required=False,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/operations",
        tasks.record_operation,
        "Record a workflow operation at the next journal index",
        permission="lease",
        body=bodies.OperationBody,
        success=201,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/sleep",
        tasks.sleep,
        "Start a durable sleep; releases the lease",
        permission="lease",
        body=bodies.SleepBody,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/non-determinism",
        tasks.report_non_determinism,
        "Report a replay divergence; parks the task",
        permission="lease",
        body=bodies.NonDeterminismBody,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/resume",
        tasks.resume,
        "Un-park a task after fixing its workflow",
        permission="admin",
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/signals",
        tasks.signal,
        "Send the task's workflow a named signal: {seq}; 409 if the task is terminal",
        permission="admin, submitter or approver",
        body=bodies.SignalBody,
        success=202,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/signal-waits",
        tasks.wait_for_signal,
        "Wait for a signal at the next journal index: a kept one is taken at once, else the lease is released",
        permission="lease",
        body=bodies.SignalWaitBody,
    ),
    ApiRoute(
        "POST",
        "/v1/tasks/{task_id}/secrets/{name}",
        secrets.read_secret,
        "Read a secret for the task whose lease the caller holds (worker keys only): {name, version, value}; the "
        "task's first read pins the version; recorded as SecretRead",
        permission="lease",
        body=bodies.SecretReadBody,
    ),
    ApiRoute(
        "GET",
        "/v1/tasks/{task_id}/events",
        streams.task_events,
        "Server-sent events of one task",
        permission="read",
        query=("after",),
    ),
    ApiRoute(
        "GET",
        "/v1/events",
        streams.org_events,
        "Server-sent events of the org (types, queue)",
        permission="read",
        query=("types", "queue", "after"),
    ),
    ApiRoute(
        "GET",
        "/v1/approvals",
        approvals.list_approvals,
        "List approvals (status, task_id)",
        permission="read",
        query=("status", "task_id", "limit", "cursor"),
    ),
    ApiRoute("GET", "/v1/approvals/{approval_id}", approvals.get_approval, "Get an approval", permission="read"),
    ApiRoute(
        "POST",
        "/v1/approvals/{approval_id}/approve",
        approvals.approve,
        "Approve",
        permission="decide",
        body=bodies.ApproveBody,
        body_required=False,
    ),
    ApiRoute(
        "POST",
        "/v1/approvals/{approval_id}/reject",
        approvals.reject,
        "Reject",
        permission="decide",
        body=bodies.RejectBody,
    ),
    ApiRoute(
        "POST",
        "/v1/workers",
        workers.register,
        "Register a worker",
        permission="workers",
        body=RegisterWorker,
        success=201,
    ),
    ApiRoute(
        "GET",
        "/v1/workers",
        workers.list_workers,
        "List workers (queue, capability, available)",
        permission="read",
        query=("queue", "capability", "available"),
    ),
    ApiRoute("GET", "/v1/workers/{worker_id}", workers.get_worker, "Get a worker", permission="read"),
    ApiRoute(
        "DELETE",
        "/v1/workers/{worker_id}",
        workers.deregister,
        "Deregister a worker",
        permission="workers",
        success=204,
    ),
    ApiRoute(
        "POST",
        "/v1/workers/{worker_id}/heartbeat",
        workers.heartbeat,
        "Worker heartbeat",
        permission="workers",
        body=bodies.WorkerHeartbeatBody,
        body_required=False,
    ),
    ApiRoute(
        "POST",
        "/v1/workers/{worker_id}/reset",
        breakers.reset,
        "Close the worker's open circuit breaker now",
        permission="admin",
    ),
    ApiRoute(
        "POST",
        "/v1/api-keys",
        keys.create,
        "Create an API key (shown once)",
        permission="admin",
        body=bodies.CreateApiKeyBody,
        success=201,
    ),
    ApiRoute("DELETE", "/v1/api-keys/{key_id}", keys.revoke, "Revoke an API key", permission="admin", success=204),
    ApiRoute(
        "POST",
        "/v1/policy-bundles",
        policy_bundles.push,
        "Push a new version of the org's policy bundle (decides later submissions)",
        permission="admin",
        body=bodies.PolicyBundleBody,
        success=201,
    ),
    ApiRoute(
        "GET",
        "/v1/policy-bundles",
        policy_bundles.list_bundles,
        "List the org's policy bundle versions, newest first",
        permission="read",
    ),
    ApiRoute(
        "GET",
        "/v1/policy-bundles/{version}",
        policy_bundles.get_bundle,
        "Get one version (or current) in full",
        permission="read",
    ),
    ApiRoute(
        "POST",
        "/v1/environments",
        environments.create,
        "Create an environment holding queues (a queue belongs to at most one); 409 if the name exists",
        permission="admin",
        body=bodies.EnvironmentBody,
        success=201,
    ),
    ApiRoute(
        "GET",
        "/v1/environments",
        environments.list_environments,
        "List the org's environments: {items, seq}",
        permission="read",
    ),
    ApiRoute("GET", "/v1/environments/{name}", environments.get_environment, "Get an environment", permission="read"),
    ApiRoute(
        "PUT",
        "/v1/environments/{name}",
        environments.replace,
        "Create or replace an environment's queues and labels",
        permission="admin",
        body=bodies.EnvironmentReplaceBody,
    ),
    ApiRoute(
        "DELETE",
        "/v1/environments/{name}",
        environments.delete,
        "Delete an environment (its queues then belong to none)",
        permission="admin",
        success=204,
    ),
    ApiRoute(
        "POST",
        "/v1/notification-channels",
        notifications.create_channel,
        "Create a notification channel: slack (url), email (smtp, secret: the SMTP password) or webhook (url, "
        "secret: the Standard Webhooks signing secret); 409 if the name exists",
        permission="admin",
        body=bodies.NotificationChannelBody,
        success=201,
    ),
    ApiRoute(
        "GET",
        "/v1/notification-channels",
        notifications.list_channels,
        "List the org's notification channels: {items, seq}",
        permission="admin",
    ),
    ApiRoute(
        "GET",
        "/v1/notification-channels/{name}",
        notifications.get_channel,
        "Get a notification channel (no secrets)",
        permission="admin",
    ),
    ApiRoute(
        "PUT",
        "/v1/notification-channels/{name}",
        notifications.replace_channel,
        "Create or replace a notification channel whole",
        permission="admin",
        body=bodies.NotificationChannelReplaceBody,
    ),
    ApiRoute(
        "DELETE",
        "/v1/notification-channels/{name}",
        notifications.delete_channel,
        "Delete a notification channel; 409 while rules send to it",
        permission="admin",
        success=204,
    ),
    ApiRoute(
        "POST",
        "/v1/notification-rules",
        notifications.create_rule,
        "Create a notification rule: send to channel when one of on happens to a task of queue, environment and "
        "workflow (each: any when absent)",
        permission="admin",
        body=bodies.NotificationRuleBody,
        success=201,
    ),
    ApiRoute(
        "GET",
        "/v1/notification-rules",
        notifications.list_rules,
        "List the org's notification rules: {items, seq}",
        permission="admin",
    ),
    ApiRoute(
        "DELETE",
        "/v1/notification-rules/{rule_id}",
        notifications.delete_rule,
        "Delete a notification rule",
        permission="admin",
        success=204,
    ),
    ApiRoute(
        "POST",
        "/v1/schedules",
        schedules.create,
        "Create a schedule: submit `task` at each time `cron` names in `timezone`; overlap skip, allow or "
        "cancel_previous (admin, submitter); 422 for a bad cron or time zone",
        permission="schedule",
        body=bodies.ScheduleBody,
        success=201,
    ),
    ApiRoute(
        "GET",
        "/v1/schedules",
        schedules.list_schedules,
        "List the org's schedules: {items}",
        permission="schedule",
        query=("min_seq",),
    ),
    ApiRoute("GET", "/v1/schedules/{schedule_id}", schedules.get_schedule, "Get a schedule", permission="schedule"),
    ApiRoute(
        "DELETE",
        "/v1/schedules/{schedule_id}",
        schedules.delete,
        "Delete a schedule (no more fires)",
        permission="schedule",
        success=204,
    ),
    ApiRoute("POST", "/v1/schedules/{schedule_id}/pause", schedules.pause, "Pause a schedule", permission="schedule"),
    ApiRoute(
        "POST",
        "/v1/schedules/{schedule_id}/resume",
        schedules.resume,
        "Resume from the next cron time",
        permission="schedule",
    ),
    ApiRoute(
        "POST",
        "/v1/schedules/{schedule_id}/trigger",
        schedules.trigger,
        "Run a schedule now (its overlap policy applies): the schedule, with last_task_id",
        permission="schedule",
    ),
    ApiRoute(
        "GET",
        "/v1/secrets",
        secrets.list_secrets,
        "List the org's secrets: names, scopes and versions, never values",
        permission="admin",
        query=("min_seq",),
    ),
    ApiRoute(
        "PUT",
        "/v1/secrets/{name}",
        secrets.put_secret,
        "Set a new version of a secret, org-wide or for one environment (write-only): {name, version}",
        permission="admin",
        body=bodies.SecretBody,
    ),
    ApiRoute(
        "GET",
        "/v1/worker-config",
        worker_config.get_config,
        "The org's worker configuration, or one environment's",
        permission="admin",
        query=("environment", "min_seq"),
    ),
    ApiRoute(
        "PUT",
        "/v1/worker-config",
        worker_config.put_config,
        "Replace the org's worker configuration, or one environment's (?environment=)",
        permission="admin",
        body=bodies.WorkerConfigBody,
        query=("environment",),
    ),
    ApiRoute(
        "GET",
        "/v1/queues",
        queues.list_queues,
        "List the queues that have settings of their own: {items, seq}",
        permission="read",
        query=("min_seq",),
    ),
    ApiRoute(
        "GET",
        "/v1/queues/{name}",
        queues.get_queue,
        "A queue's settings (the defaults when it has none)",
        permission="read",
    ),
    ApiRoute(
        "PUT",
        "/v1/queues/{name}",
        queues.configure,
        "Set a queue's claim strategy (fifo, least_loaded, round_robin, random) and its workers' breaker, whole",
        permission="admin",
        body=bodies.QueueSettingsBody,
    ),
    ApiRoute(
        "DELETE",
        "/v1/queues/{name}",
        queues.remove,
        "Back to the defaults; answers the queue's settings and the seq",
        permission="admin",
    ),
    ApiRoute("GET", "/v1/stats", system.stats, "Counts by status and projection lag", permission="read"),
    ApiRoute(
        "GET",
        "/v1/usage",
        usage.usage,
        "Recorded LLM calls, tokens and cost per UTC day and model (from, to: YYYY-MM-DD, both included, default "
        "the last 30 days; group_by: day,model, a key left out is null; queue, workflow)",
        permission="read",
        query=("from", "to", "group_by", "queue", "workflow", "min_seq"),
    ),
    ApiRoute("GET", "/healthz", system.healthz, "Process is up", permission=PUBLIC),
    ApiRoute("GET", "/readyz", system.readyz, "NATS, PostgreSQL and projections reachable", permission=PUBLIC),
    ApiRoute("GET", "/metrics", system.metrics, "Prometheus metrics", permission=PUBLIC),
    ApiRoute("GET", "/openapi.json", openapi.openapi, "This document", permission=PUBLIC),
    ApiRoute("GET", "/docs", openapi.docs, "Human-readable API reference", permission=PUBLIC),
    *console_routes.ROUTES,
]
"""Every route the gateway serves: the API's declare what /openapi.json says of them (gateway.openapi),
the console's pages are left out of it."""


def build_app(svc: Services) -> Starlette:
    handled = (
        Problem,
        Rejected,
        InvalidToken,
        msgspec.ValidationError,
        msgspec.DecodeError,
        StoreError,
        nats.errors.Error,
        *DATABASE_UNAVAILABLE,
        HTTPException,
    )
    app = Starlette(
        routes=ROUTES,
        # RequestTelemetry outermost: every answer, the 503 of ObserveRequests too, carries the request id.
        middleware=[Middleware(RequestTelemetry), Middleware(ObserveRequests, services=svc)],
        exception_handlers={kind: handle_problem for kind in handled},
    )
    app.state.services = svc
    app.state.openapi = openapi_document(app.routes)
    return app


class ObserveRequests:
    """Counts and times every request by route template, and turns anything unexpected into a 503
    problem+json (logged) instead of a bare 500."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.metrics = services.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def observe(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            status = 503
            await problem_response(
                503, "the service could not complete the request; retry later", {"Retry-After": "1"}
            )(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
