"""The runner's side of the public HTTP API: a runner is a worker like any other.

Transient failures are retried, never reported: a 429, 502, 503 or 504, or a connection that cannot
be made or breaks, is tried again after a bounded exponential backoff with full jitter, and never
sooner than the answer's ``Retry-After``. Every POST carries an ``Idempotency-Key`` that its retries
reuse, so the retry of a request whose answer was lost returns the original outcome and appends
nothing. Past the retry budget a call raises :class:`Unavailable`, which the runner never counts as
the workflow's failure. A 409 is :class:`LeaseLost` at once: it is an answer, not a glitch.

The retrying itself is :mod:`controlplane.client.transport`'s, shared with the Python client; its
names are re-exported here for the runner's modules and tests."""

from __future__ import annotations

from typing import Any

import httpx

from controlplane.client.drivers import AsyncDriver
from controlplane.client.errors import Unavailable
from controlplane.client.transport import (
    MAX_RETRY_AFTER_SECONDS,
    RETRY_BUDGET_SECONDS,
    TRANSIENT_STATUSES,
    Call,
    backoff_delay,
    exchange,
    retry_after_seconds,
)
from core import telemetry

__all__ = [
    "MAX_RETRY_AFTER_SECONDS",
    "RETRY_BUDGET_SECONDS",
    "TRANSIENT_STATUSES",
    "LeaseLost",
    "TaskApi",
    "Unavailable",
    "backoff_delay",
    "retry_after_seconds",
]


class LeaseLost(Exception):
    """The gateway answered 409 for a lease-bound call: another runner may own the task now."""


class TaskApi:
    def __init__(
        self, base_url: str, api_key: str, *, timeout: float = 40.0, retry_seconds: float = RETRY_BUDGET_SECONDS
    ) -> None:
        self._driver = AsyncDriver(
            httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
        )
        self._retry_seconds = retry_seconds

    async def close(self) -> None:
        await self._driver.close()

    async def register(self, worker_id: str, queue: str, capabilities: list[str], incarnation: str) -> dict[str, Any]:
        """``incarnation`` names this process: registering as a new one releases the old one's leases. The
        answer is the worker, with the ``config`` the org set for it (gateway/worker_config.py)."""
        body = {"worker_id": worker_id, "queue": queue, "capabilities": capabilities, "incarnation": incarnation}
        return await self._call("POST", "/v1/workers", body)

    async def worker_heartbeat(self, worker_id: str, status: str) -> None:
        await self._call("POST", f"/v1/workers/{worker_id}/heartbeat", {"status": status})

    async def claim(
        self, worker_id: str, queue: str, capabilities: list[str], block_ms: int, lease_seconds: float, max_tasks: int
    ) -> list[dict[str, Any]]:
        """Up to ``max_tasks`` claims, each ``{task, lease}``; none if nothing came free within ``block_ms``.
        A retry reuses the Idempotency-Key: claims whose answer was lost are returned, not stranded."""
        response = await self._request(
            "POST",
            "/v1/tasks/claim-batch",
            {
                "worker_id": worker_id,
                "queue": queue,
                "capabilities": capabilities,
                "block_ms": block_ms,
                "lease_seconds": lease_seconds,
                "max_tasks": max_tasks,
                "workflows_only": True,
            },
        )
        if response.status_code == 204:
            return []
        _raise_for(response)
        return response.json()["items"]  # type: ignore[no-any-return]

    async def secret(self, task_id: str, name: str, lease: dict[str, str]) -> dict[str, Any]:
        """``{name, version, value}`` of the secret for the task whose lease this is; the read is audited."""
        return await self._call("POST", f"/v1/tasks/{task_id}/secrets/{name}", lease)

    async def policy_bundle(self, version: int) -> dict[str, Any]:
        """Version ``version`` of the org's policy bundle, in full (``wasm`` base64 or null)."""
        response = await self._request("GET", f"/v1/policy-bundles/{version}")
        _raise_for(response)
        return response.json()  # type: ignore[no-any-return]

    async def lease_call(self, task_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """heartbeat, operations, sleep, approval-requests, complete, fail, non-determinism."""
        return await self._call("POST", f"/v1/tasks/{task_id}/{action}", body)

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._request(method, path, body)
        _raise_for(response)
        return response.json() if response.content else {}  # type: ignore[no-any-return]

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """The first answer that is not transient, retried with backoff within the retry budget. A call
        made for a task carries the task's correlation id as ``X-Request-Id`` (so the events it appends
        carry the submit's) and, with tracing on, the current span as ``traceparent``."""
        call = Call.of(method, path, body, headers=context_headers())
        return await self._driver.run(exchange(call, self._retry_seconds))


def context_headers() -> dict[str, str]:
    headers = {}
    if (correlation_id := telemetry.correlation_id.get()) is not None:
        headers["X-Request-Id"] = correlation_id
    if (traceparent := telemetry.current_traceparent()) is not None:
        headers[telemetry.TRACEPARENT] = traceparent
    return headers


def _raise_for(response: httpx.Response) -> None:
    if response.status_code == 409:
        raise LeaseLost(response.json().get("detail", response.text))
    if response.is_error:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:500]}"
        )
