"""What the gateway observes of every request: its identity for logs, events and traces (its request id,
the correlation id of the events it appends; its server span; one access-log line), its count and
latency by route, and an unexpected error turned into a logged 503 problem.

The request id is the caller's ``X-Request-Id`` when that is a plausible token (1 to 128 characters
of ``[A-Za-z0-9._:-]``, starting with a letter or digit); else the trace id of a valid W3C
``traceparent``; else this request's own trace id when tracing is on; else a new id. A hostile or
malformed header is replaced, never refused: the id is for finding log lines, not a credential. It is
returned as ``X-Request-Id`` on every answer (problems and the 503 of an unexpected error included),
bound in ``core.telemetry`` for the log lines of the request, and stored by the command handler as
the ``Cp-Correlation-Id`` header of every event the request appends."""

from __future__ import annotations

import logging
import os
import re
import time

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import telemetry
from core.domain.ids import new_id
from gateway.problems import problem_response
from gateway.services import Services

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ACCESS_LOG_ENV = "CP_ACCESS_LOG"

access_log = logging.getLogger("gateway.access")
log = logging.getLogger(__name__)


def request_id_from(given: str | None, traceparent: str | None) -> str | None:
    """The caller's id if it is acceptable, else the trace id of its ``traceparent``, else None."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return telemetry.trace_id_of(traceparent)


class ObserveRequests:
    """Our one middleware, outermost of ours, so that whatever answers (a route, a problem handler, the
    503 made here of an unexpected error) answers with the request id, inside the request's span; and
    each request is counted and timed by route template and logged as one access-log line."""

    def __init__(self, app: ASGIApp, services: Services, *, access_log_enabled: bool | None = None) -> None:
        self.app = app
        self.metrics = services.metrics
        if access_log_enabled is None:
            access_log_enabled = os.environ.get(ACCESS_LOG_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self.access_log = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        traceparent = headers.get("traceparent")
        request_id = request_id_from(headers.get("x-request-id"), traceparent)
        method = scope["method"]
        started = time.perf_counter()
        status = 500
        response_started = False

        async def answer(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id or ""
            await send(message)

        with telemetry.span(
            method, {"http.request.method": method, "url.path": scope["path"]}, parent=traceparent, kind=SpanKind.SERVER
        ) as span:
            request_id = request_id or telemetry.current_trace_id() or new_id()
            try:
                with telemetry.bound(correlation_id=request_id):
                    try:
                        await self.app(scope, receive, answer)
                    except Exception:
                        log.exception("unhandled error on %s %s", method, scope["path"])
                        if response_started:
                            raise
                        await problem_response(
                            503, "the service could not complete the request; retry later", {"Retry-After": "1"}
                        )(scope, receive, answer)
            finally:
                elapsed = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", None)
                self.metrics.requests.labels(method, route or "unmatched", str(status)).inc()
                self.metrics.latency.labels(method, route or "unmatched").observe(elapsed)
                if span is not None:
                    span.update_name(f"{method} {route}" if route else method)
                    telemetry.set_attributes(
                        span, {"http.route": route, "http.response.status_code": status, "cp.request_id": request_id}
                    )
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                if self.access_log and access_log.isEnabledFor(logging.INFO):
                    with telemetry.bound(correlation_id=request_id):
                        access_log.info(
                            "%s %s %d",
                            method,
                            route or "unmatched",
                            status,
                            extra={
                                "http_method": method,
                                "http_route": route,
                                "http_path": scope["path"][:1024],
                                "http_status": status,
                                "duration_ms": round(elapsed * 1000, 2),
                            },
                        )
