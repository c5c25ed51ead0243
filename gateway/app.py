"""The gateway's wiring, in one place: routes, middleware, error handlers."""

from __future__ import annotations

import logging
import time

import msgspec
import nats.errors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.domain.errors import Rejected
from core.domain.ids import InvalidToken
from core.log.event_store import StoreError
from gateway import (
    approvals,
    breakers,
    environments,
    keys,
    notifications,
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
from gateway.problems import Problem, handle_problem, problem_response
from gateway.services import Services
from projections.read import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)


def build_app(svc: Services) -> Starlette:
    routes = [
        Route("/v1/tasks", tasks.submit, methods=["POST"]),
        Route("/v1/tasks", tasks.list_tasks, methods=["GET"]),
        Route("/v1/tasks/claim", tasks.claim, methods=["POST"]),
        Route("/v1/tasks/claim-batch", tasks.claim_batch, methods=["POST"]),
        Route("/v1/tasks/{task_id}", tasks.get_task, methods=["GET"]),
        Route("/v1/tasks/{task_id}/heartbeat", tasks.heartbeat, methods=["POST"]),
        Route("/v1/tasks/{task_id}/approval-requests", tasks.request_approval, methods=["POST"]),
        Route("/v1/tasks/{task_id}/complete", tasks.complete, methods=["POST"]),
        Route("/v1/tasks/{task_id}/fail", tasks.fail, methods=["POST"]),
        Route("/v1/tasks/{task_id}/cancel", tasks.cancel, methods=["POST"]),
        Route("/v1/tasks/{task_id}/operations", tasks.record_operation, methods=["POST"]),
        Route("/v1/tasks/{task_id}/sleep", tasks.sleep, methods=["POST"]),
        Route("/v1/tasks/{task_id}/non-determinism", tasks.report_non_determinism, methods=["POST"]),
        Route("/v1/tasks/{task_id}/resume", tasks.resume, methods=["POST"]),
        Route("/v1/tasks/{task_id}/signals", tasks.signal, methods=["POST"]),
        Route("/v1/tasks/{task_id}/signal-waits", tasks.wait_for_signal, methods=["POST"]),
        Route("/v1/tasks/{task_id}/secrets/{name}", secrets.read_secret, methods=["POST"]),
        Route("/v1/tasks/{task_id}/events", streams.task_events, methods=["GET"]),
        Route("/v1/events", streams.org_events, methods=["GET"]),
        Route("/v1/approvals", approvals.list_approvals, methods=["GET"]),
        Route("/v1/approvals/{approval_id}", approvals.get_approval, methods=["GET"]),
        Route("/v1/approvals/{approval_id}/approve", approvals.approve, methods=["POST"]),
        Route("/v1/approvals/{approval_id}/reject", approvals.reject, methods=["POST"]),
        Route("/v1/workers", workers.register, methods=["POST"]),
        Route("/v1/workers", workers.list_workers, methods=["GET"]),
        Route("/v1/workers/{worker_id}", workers.get_worker, methods=["GET"]),
        Route("/v1/workers/{worker_id}", workers.deregister, methods=["DELETE"]),
        Route("/v1/workers/{worker_id}/heartbeat", workers.heartbeat, methods=["POST"]),
        Route("/v1/workers/{worker_id}/reset", breakers.reset, methods=["POST"]),
        Route("/v1/api-keys", keys.create, methods=["POST"]),
        Route("/v1/api-keys/{key_id}", keys.revoke, methods=["DELETE"]),
        Route("/v1/policy-bundles", policy_bundles.push, methods=["POST"]),
        Route("/v1/policy-bundles", policy_bundles.list_bundles, methods=["GET"]),
        Route("/v1/policy-bundles/{version}", policy_bundles.get_bundle, methods=["GET"]),
        Route("/v1/environments", environments.create, methods=["POST"]),
        Route("/v1/environments", environments.list_environments, methods=["GET"]),
        Route("/v1/environments/{name}", environments.get_environment, methods=["GET"]),
        Route("/v1/environments/{name}", environments.replace, methods=["PUT"]),
        Route("/v1/environments/{name}", environments.delete, methods=["DELETE"]),
        Route("/v1/notification-channels", notifications.create_channel, methods=["POST"]),
        Route("/v1/notification-channels", notifications.list_channels, methods=["GET"]),
        Route("/v1/notification-channels/{name}", notifications.get_channel, methods=["GET"]),
        Route("/v1/notification-channels/{name}", notifications.replace_channel, methods=["PUT"]),
        Route("/v1/notification-channels/{name}", notifications.delete_channel, methods=["DELETE"]),
        Route("/v1/notification-rules", notifications.create_rule, methods=["POST"]),
        Route("/v1/notification-rules", notifications.list_rules, methods=["GET"]),
        Route("/v1/notification-rules/{rule_id}", notifications.delete_rule, methods=["DELETE"]),
        Route("/v1/schedules", schedules.create, methods=["POST"]),
        Route("/v1/schedules", schedules.list_schedules, methods=["GET"]),
        Route("/v1/schedules/{schedule_id}", schedules.get_schedule, methods=["GET"]),
        Route("/v1/schedules/{schedule_id}", schedules.delete, methods=["DELETE"]),
        Route("/v1/schedules/{schedule_id}/pause", schedules.pause, methods=["POST"]),
        Route("/v1/schedules/{schedule_id}/resume", schedules.resume, methods=["POST"]),
        Route("/v1/schedules/{schedule_id}/trigger", schedules.trigger, methods=["POST"]),
        Route("/v1/secrets", secrets.list_secrets, methods=["GET"]),
        Route("/v1/secrets/{name}", secrets.put_secret, methods=["PUT"]),
        Route("/v1/worker-config", worker_config.get_config, methods=["GET"]),
        Route("/v1/worker-config", worker_config.put_config, methods=["PUT"]),
        Route("/v1/queues", queues.list_queues, methods=["GET"]),
        Route("/v1/queues/{name}", queues.get_queue, methods=["GET"]),
        Route("/v1/queues/{name}", queues.configure, methods=["PUT"]),
        Route("/v1/queues/{name}", queues.remove, methods=["DELETE"]),
        Route("/v1/stats", system.stats, methods=["GET"]),
        Route("/v1/usage", usage.usage, methods=["GET"]),
        Route("/healthz", system.healthz, methods=["GET"]),
        Route("/readyz", system.readyz, methods=["GET"]),
        Route("/metrics", system.metrics, methods=["GET"]),
        Route("/openapi.json", system.openapi, methods=["GET"]),
        Route("/docs", system.docs, methods=["GET"]),
        *console_routes.ROUTES,
    ]
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
        routes=routes,
        # RequestTelemetry outermost: every answer, the 503 of ObserveRequests too, carries the request id.
        middleware=[Middleware(RequestTelemetry), Middleware(ObserveRequests, services=svc)],
        exception_handlers={kind: handle_problem for kind in handled},
    )
    app.state.services = svc
    app.state.openapi = system.openapi_document()
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
