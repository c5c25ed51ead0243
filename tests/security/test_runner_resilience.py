"""Issue 14, finding 14: a runner survives a gateway that answers 429 and 503 now and then. It retries
with backoff (waiting at least ``Retry-After``), reuses each request's ``Idempotency-Key`` so a retried
request whose answer was lost changes nothing twice, keeps claiming, and never burns one of a task's
retries on a transient error: behind a proxy that fails part of every kind of request, every task
completes with ``retries == 0`` and every step runs once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from controlplane.embedded import free_port
from core.domain.ids import new_id
from runners.client import MAX_RETRY_AFTER_SECONDS, TaskApi, Unavailable, backoff_delay, retry_after_seconds
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from runners.runner import Runner
from tests.gateway.conftest import Stack
from tests.gateway.test_runner import until
from tests.security.test_lease_binding import security_stack  # noqa: F401  (fixture `stack`)

EVERY = 3
"""The 1st, 4th, 7th… request of each kind fails: even a runner's very first request (registering)."""
MODES = ("503 before", "429 before", "503 after")
"""How an injected failure looks: refused before reaching the gateway (503, or 429 with Retry-After:
1), or forwarded and its answer replaced by a 503 (the gateway did it; the runner cannot know)."""
RETRY_AFTER_SECONDS = 1.0


# --- the backoff ---------------------------------------------------------------------------------


def test_the_backoff_grows_exponentially_within_bounds_and_honours_retry_after() -> None:
    assert [backoff_delay(n, draw=lambda: 1.0) for n in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert backoff_delay(3, draw=lambda: 0.0) == 0.0, "full jitter reaches down to no wait at all"
    assert backoff_delay(10_000, draw=lambda: 1.0) == 5.0, "bounded, however many attempts"
    assert backoff_delay(0, retry_after=2.0, draw=lambda: 1.0) == 2.0, "never sooner than the server asked"
    assert backoff_delay(6, retry_after=0.5, draw=lambda: 1.0) == 5.0
    assert backoff_delay(0, retry_after=10**6) == MAX_RETRY_AFTER_SECONDS


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Sun, 01 Mar 2026 12:00:04 GMT", now) == 4.0
    assert retry_after_seconds("Sun, 01 Mar 2026 11:00:00 GMT", now) == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


async def test_a_call_that_stays_unavailable_gives_up_after_its_budget_as_unavailable() -> None:
    port = free_port()  # nothing listens: every attempt fails to connect
    api = TaskApi(f"http://127.0.0.1:{port}", "cp_x_y", retry_seconds=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="gave up after"):
            await api.lease_call("t1", "heartbeat", {"worker_id": "w1", "lease_id": "l1"})
    finally:
        await api.close()
    assert time.monotonic() - started < 2


# --- a flaky gateway ---------------------------------------------------------------------------------


@dataclass
class Seen:
    kind: str
    key: str | None
    at: float
    injected: str | None


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the gateway that fails the 1st, 4th, 7th… POST of each
    kind (claim-batch, operations, heartbeat, register…), cycling through :data:`MODES`."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.url = upstream, ""
        self.seen: list[Seen] = []
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._client = httpx.AsyncClient(base_url=upstream, timeout=40)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        content = await request.body()
        kind = _kind(request.method, request.url.path)
        self.counts[kind] += 1
        mode = None
        if request.method == "POST" and self.counts[kind] % EVERY == 1:
            mode = MODES[self.failures[kind] % len(MODES)]
            self.failures[kind] += 1
        self.seen.append(Seen(kind, request.headers.get("idempotency-key"), time.monotonic(), mode))
        if mode == "503 before":
            response = Response(b"", 503)
        elif mode == "429 before":
            response = Response(b"", 429, headers={"Retry-After": str(int(RETRY_AFTER_SECONDS))})
        else:
            query = f"?{request.url.query}" if request.url.query else ""
            forwarded = await self._client.request(
                request.method,
                request.url.path + query,
                content=content,
                headers={k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            response = Response(
                forwarded.content,
                503 if mode == "503 after" else forwarded.status_code,
                headers={k: v for k, v in forwarded.headers.items() if k.lower() not in HOP_BY_HOP},
            )
        await response(scope, receive, send)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[FlakyProxy]:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(self, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        async with self._client:
            serving = asyncio.get_running_loop().create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.02)
            self.url = f"http://127.0.0.1:{port}"
            try:
                yield self
            finally:
                server.should_exit = True
                await asyncio.wait_for(serving, 10)


HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


def _kind(method: str, path: str) -> str:
    parts = path.strip("/").split("/")  # v1, tasks|workers, ...
    if parts[1:] == ["workers"]:
        return "register"
    if parts[1] == "workers":
        return "worker-heartbeat"
    if parts[1:] == ["tasks", "claim-batch"]:
        return "claim-batch"
    return parts[-1] if method == "POST" else f"GET {parts[1]}"


runs: Counter[str] = Counter()


def effect(n: int, *, idempotency_key: str) -> int:
    runs[f"first {idempotency_key}"] += 1
    return n * 2


async def slow_effect(n: int, *, idempotency_key: str) -> int:
    runs[f"slow {idempotency_key}"] += 1
    await asyncio.sleep(2.5)  # long enough for a heartbeat to renew the lease
    return n * 3


@workflow("weathers-the-storm", version=1)
async def weathers_the_storm(ctx: WorkflowContext, payload: dict[str, int]) -> dict[str, int]:
    first = await ctx.step("first", effect, payload["n"])
    await ctx.sleep(0.2)
    slow = await ctx.step("slow", slow_effect, payload["n"])
    return {"first": first, "slow": slow}


async def test_a_runner_behind_a_flaky_gateway_completes_every_task_without_using_a_retry(stack: Stack) -> None:
    runs.clear()
    queue = f"rr{new_id()[-10:]}"
    tasks = 8
    async with stack.client() as admin, FlakyProxy(stack.url).serving() as proxy:
        body = {"type": "storm", "queue": queue, "workflow": {"name": "weathers-the-storm", "version": 1}}
        ids = [
            (await admin.post("/v1/tasks", json={**body, "payload": {"n": n}, "max_retries": 3})).json()["id"]
            for n in range(tasks)
        ]
        api = TaskApi(proxy.url, stack.keys["acme"]["worker"])
        registry = Registry([weathers_the_storm])
        runner = Runner(api, registry, worker_id="storm", queue=queue, concurrency=4, lease_seconds=6, block_ms=300)
        stop = asyncio.Event()
        job = asyncio.create_task(runner.run(stop))
        try:

            async def all_completed() -> bool:
                assert not job.done(), f"the runner stopped: {job.exception()!r}"
                listed = [(await admin.get(f"/v1/tasks/{task_id}")).json() for task_id in ids]
                return all(task["status"] == "completed" for task in listed)

            await until(all_completed, within=90)
        finally:
            stop.set()
            await asyncio.wait_for(job, 30)
            await api.close()
        done = [(await admin.get(f"/v1/tasks/{task_id}")).json() for task_id in ids]

    assert [task["retries"] for task in done] == [0] * tasks, "no transient error cost a task a retry"
    assert [task["result"] for task in done] == [{"first": 2 * n, "slow": 3 * n} for n in range(tasks)]
    assert sorted(runs.values()) == [1] * (2 * tasks), "every step ran once: a lost answer was not re-run"
    assert proxy.counts["fail"] == 0, "a transient error was never reported as the workflow's failure"
    for kind in ("register", "claim-batch", "operations", "sleep", "heartbeat", "complete"):
        assert proxy.failures[kind] >= 1, f"no failure was injected into {kind}: {dict(proxy.failures)}"
    assert proxy.failures["claim-batch"] >= len(MODES) and proxy.failures["operations"] >= len(MODES)
    keys = Counter(seen.key for seen in proxy.seen if seen.key is not None)
    assert any(keys[seen.key] > 1 for seen in proxy.seen if seen.injected == "503 after"), "lost answers were retried"
    for index, failed in enumerate(proxy.seen):
        if failed.injected is None:
            continue
        assert failed.key is not None, f"{failed.kind} carried no Idempotency-Key"
        retried = next((s for s in proxy.seen[index + 1 :] if s.key == failed.key), None)
        if retried is None:
            # Not retried: a renewal or liveness beat whose run or runner ended while it waited, or a
            # request the gateway did carry out, whose run was then stopped by the renewal's 409 (a
            # task completed or asleep is no longer held). A request that never arrived is retried.
            dropped = failed.kind in ("heartbeat", "worker-heartbeat") or failed.injected == "503 after"
            assert dropped, f"{failed.kind} ({failed.injected}) was not retried with its Idempotency-Key"
            continue
        if failed.injected == "429 before":
            waited = timedelta(seconds=retried.at - failed.at)
            assert waited >= timedelta(seconds=RETRY_AFTER_SECONDS - 0.05), f"{failed.kind}: Retry-After ignored"
