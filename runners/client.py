"""The runner's side of the public HTTP API: a runner is a worker like any other.

Transient failures are retried, never reported: a 429, 502, 503 or 504, or a connection that cannot
be made or breaks, is tried again after a bounded exponential backoff with full jitter, and never
sooner than the answer's ``Retry-After``. Every POST carries an ``Idempotency-Key`` that its retries
reuse, so the retry of a request whose answer was lost returns the original outcome and appends
nothing. Past the retry budget a call raises :class:`Unavailable`, which the runner never counts as
the workflow's failure. A 409 is :class:`LeaseLost` at once: it is an answer, not a glitch."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 5.0
MAX_RETRY_AFTER_SECONDS = 60.0
"""A ``Retry-After`` beyond this is waited for only this long (then the budget decides)."""
RETRY_BUDGET_SECONDS = 60.0
"""How long one call keeps retrying. Longer than a lease is harmless: a call under a lease that
expired meanwhile ends with :class:`LeaseLost`."""


class LeaseLost(Exception):
    """The gateway answered 409 for a lease-bound call: another runner may own the task now."""


class Unavailable(Exception):
    """The gateway kept answering 429/502/503/504, or could not be reached, for the whole retry budget."""


def backoff_delay(
    attempt: int,
    retry_after: float | None = None,
    *,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
    draw: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first): uniformly drawn below
    ``base * 2**attempt`` bounded by ``cap`` (full jitter, so many runners do not retry in step), and at
    least the server's ``Retry-After`` (itself bounded by :data:`MAX_RETRY_AFTER_SECONDS`)."""
    jittered = draw() * min(cap, base * 2 ** min(attempt, 32))
    if retry_after is None:
        return jittered
    return max(jittered, min(max(retry_after, 0.0), MAX_RETRY_AFTER_SECONDS))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


class TaskApi:
    def __init__(
        self, base_url: str, api_key: str, *, timeout: float = 40.0, retry_seconds: float = RETRY_BUDGET_SECONDS
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )
        self._retry_seconds = retry_seconds

    async def close(self) -> None:
        await self._http.aclose()

    async def register(self, worker_id: str, queue: str, capabilities: list[str]) -> None:
        await self._call("POST", "/v1/workers", {"worker_id": worker_id, "queue": queue, "capabilities": capabilities})

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
        """The first answer that is not transient, retried with backoff within the retry budget."""
        headers = {"Idempotency-Key": uuid.uuid4().hex} if method == "POST" else {}
        started = time.monotonic()
        attempt = 0
        while True:
            retry_after = None
            try:
                response = await self._http.request(method, path, json=body, headers=headers)
            except httpx.TransportError as exc:
                failure: str = repr(exc)
                cause: BaseException | None = exc
            else:
                if response.status_code not in TRANSIENT_STATUSES:
                    return response
                failure, cause = f"{response.status_code} {response.text[:200]}", None
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            delay = backoff_delay(attempt, retry_after)
            waited = time.monotonic() - started
            if waited + delay > self._retry_seconds:
                raise Unavailable(
                    f"{method} {path}: {failure}; gave up after {attempt + 1} attempts in {waited:.1f} s"
                ) from cause
            log.info("%s %s: %s; retry %d in %.2f s", method, path, failure, attempt + 1, delay)
            await asyncio.sleep(delay)
            attempt += 1


def _raise_for(response: httpx.Response) -> None:
    if response.status_code == 409:
        raise LeaseLost(response.json().get("detail", response.text))
    if response.is_error:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:500]}"
        )
