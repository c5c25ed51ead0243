"""The Python client (``controlplane.client``) against a real stack: how many submit+get round trips a
second it does, blocking and with asyncio, and how soon ``wait_for_result`` returns after the task ends.

Starts its own stack (``controlplane dev`` in a subprocess on 127.0.0.1, a temporary data dir; on the
PostgreSQL of ``DATABASE_URL`` in a fresh database when that is set, else an embedded one) and stops it
with everything it started at the end, also on Ctrl-C or an error. Works as org acme on a queue of its
own (``bench-client``, no workflow: the dev runner never takes these tasks):

- Round trips: ``--round-trips`` times ``submit`` then ``get`` of that task, one after another with
  bare ``httpx.Client`` (the baseline: the client's own cost is the difference), then with ``Client``;
  then as many with ``AsyncClient``, ``--in-flight`` at a time.
- ``wait_for_result``: ``--waits`` times, a task is submitted, an ``AsyncClient`` starts waiting for it
  and, once the wait is under way, a worker claims and completes the task over plain HTTP; measured
  from the complete request's answer to ``wait_for_result``'s return. Once over the task's SSE feed,
  once with the feed refused (the client falls back to the ``?wait_seconds=`` long-poll).

    .venv/bin/python bench/client.py [--round-trips 1000] [--in-flight 16] [--waits 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from lifecycle import pct

from controlplane.client import AsyncClient, Client
from controlplane.devstack import fresh_database, running_dev_stack
from controlplane.embedded_postgres import database_url_from_env

QUEUE = "bench-client"
WORKER = "bench-client-worker"
WARMUP = 20
"""Untimed round trips first: connections open, code paths warm."""
UNDER_WAY_SECONDS = 0.2
"""How long after starting a wait the task is completed: by then the wait has read the task and
opened its feed (or started its long-poll), so what is timed is the notification alone."""


class RefuseFeeds(httpx.AsyncBaseTransport):
    """Answers every event-stream request as a gateway with no stream slots left would (429), so the
    client long-polls instead; everything else goes to the gateway."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            problem = {"title": "Too many requests", "status": 429, "detail": "no stream slots left"}
            return httpx.Response(429, json=problem, headers={"Retry-After": "5"})
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": pct(samples, 0.5), "p99": pct(samples, 0.99), "max": max(samples)}


def raw_round_trips(url: str, key: str, count: int) -> dict[str, Any]:
    """The same round trips with bare ``httpx.Client`` and ``json()``: what the client adds is the rest."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:

        def round_trip(payload: dict[str, Any]) -> None:
            submitted = http.post("/v1/tasks", json={"type": "bench", "payload": payload, "queue": QUEUE})
            submitted.raise_for_status()
            http.get(f"/v1/tasks/{submitted.json()['id']}").raise_for_status()

        for _ in range(WARMUP):
            round_trip({})
        samples = []
        started = time.perf_counter()
        for n in range(count):
            sent = time.perf_counter()
            round_trip({"n": n})
            samples.append((time.perf_counter() - sent) * 1000)
        elapsed = time.perf_counter() - started
    return {"per_second": count / elapsed, "ms": summary(samples)}


def blocking_round_trips(url: str, key: str, count: int) -> dict[str, Any]:
    with Client(url, api_key=key) as client:
        for _ in range(WARMUP):
            client.get(client.submit("bench", {}, queue=QUEUE).id)
        samples = []
        started = time.perf_counter()
        for n in range(count):
            sent = time.perf_counter()
            client.get(client.submit("bench", {"n": n}, queue=QUEUE).id)
            samples.append((time.perf_counter() - sent) * 1000)
        elapsed = time.perf_counter() - started
    return {"per_second": count / elapsed, "ms": summary(samples)}


async def async_round_trips(url: str, key: str, count: int, in_flight: int) -> dict[str, Any]:
    async with AsyncClient(url, api_key=key) as client:
        samples: list[float] = []
        slots = asyncio.Semaphore(in_flight)

        async def round_trip(n: int) -> None:
            async with slots:
                sent = time.perf_counter()
                await client.get((await client.submit("bench", {"n": n}, queue=QUEUE)).id)
                samples.append((time.perf_counter() - sent) * 1000)

        await asyncio.gather(*(round_trip(n) for n in range(WARMUP)))
        samples.clear()
        started = time.perf_counter()
        await asyncio.gather(*(round_trip(n) for n in range(count)))
        elapsed = time.perf_counter() - started
    return {"per_second": count / elapsed, "ms": summary(samples)}


async def wait_latencies(url: str, keys: dict[str, str], count: int, transport: RefuseFeeds | None) -> dict[str, Any]:
    """Milliseconds from a task's completion being answered to ``wait_for_result`` returning it."""
    worker = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {keys['worker']}"}, timeout=30)
    waiter = AsyncClient(url, api_key=keys["viewer"], transport=transport)
    submitter = AsyncClient(url, api_key=keys["submitter"])
    samples = []
    async with worker, waiter, submitter:
        for n in range(count):
            task = await submitter.submit("bench-wait", {"n": n}, queue=QUEUE, priority="critical")
            waiting = asyncio.create_task(waiter.wait_for_result(task.id, timeout=30))
            await asyncio.sleep(UNDER_WAY_SECONDS)
            claimed = await worker.post("/v1/tasks/claim", json={"worker_id": WORKER, "queue": QUEUE})
            claimed.raise_for_status()
            if claimed.json()["task"]["id"] != task.id:
                raise RuntimeError("another task was claimed: the bench queue must hold only the bench's tasks")
            lease = {"worker_id": WORKER, "lease_id": claimed.json()["lease"]["id"]}
            completed = await worker.post(f"/v1/tasks/{task.id}/complete", json={**lease, "result": n})
            completed.raise_for_status()
            answered = time.perf_counter()
            done = await waiting
            samples.append((time.perf_counter() - answered) * 1000)
            if done.result != n:
                raise RuntimeError(f"wait_for_result returned {done.status} {done.result!r}, not the result {n}")
    return {"ms": summary(samples)}


async def drain_queue(url: str, key: str) -> None:
    """The round trips left their tasks pending on the queue: cancel them, so the wait samples' worker
    claims only the task each sample submitted."""
    async with AsyncClient(url, api_key=key) as client:
        pending = [task.id async for task in client.list(queue=QUEUE, status="pending", limit=500)]
        slots = asyncio.Semaphore(16)

        async def cancel(task_id: str) -> None:
            async with slots:
                await client.cancel(task_id, reason="bench round trip")

        await asyncio.gather(*(cancel(task_id) for task_id in pending))


def run(url: str, keys: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"round_trips": {}, "wait_for_result": {}}
    result["round_trips"]["bare httpx.Client (baseline)"] = raw_round_trips(url, keys["submitter"], args.round_trips)
    result["round_trips"]["Client"] = blocking_round_trips(url, keys["submitter"], args.round_trips)
    result["round_trips"][f"AsyncClient, {args.in_flight} in flight"] = asyncio.run(
        async_round_trips(url, keys["submitter"], args.round_trips, args.in_flight)
    )
    asyncio.run(drain_queue(url, keys["submitter"]))
    result["wait_for_result"]["SSE feed"] = asyncio.run(wait_latencies(url, keys, args.waits, None))
    result["wait_for_result"]["long-poll (feed refused)"] = asyncio.run(
        wait_latencies(url, keys, args.waits, RefuseFeeds())
    )
    return result


def machine() -> dict[str, str]:
    def output(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""

    model = next((line.split(":", 1)[1].strip() for line in output("lscpu").splitlines() if "Model name" in line), "?")
    return {
        "cpus": output("nproc").strip(),
        "cpu_model": model,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| measurement | per second | p50 ms | p99 ms | max ms | n |", "|---|---|---|---|---|---|"]
    for group in ("round_trips", "wait_for_result"):
        for name, measured in result[group].items():
            ms = measured["ms"]
            rate = f"{measured['per_second']:,.0f}" if "per_second" in measured else ""
            label = f"{group.replace('_', ' ')}: {name}"
            lines.append(f"| {label} | {rate} | {ms['p50']:.2f} | {ms['p99']:.2f} | {ms['max']:.2f} | {ms['n']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=1000, help="timed submit+get pairs per client kind")
    parser.add_argument("--in-flight", type=int, default=16, help="concurrent round trips of the AsyncClient")
    parser.add_argument("--waits", type=int, default=50, help="timed wait_for_result samples per mode")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    # Without provider keys the dev stack's example workflows never reach a model over the network.
    env = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        server_url = database_url_from_env()
        with fresh_database(server_url, "bench_client") if server_url else contextlib.nullcontext() as database_url:
            if database_url:
                env["DATABASE_URL"] = database_url
            with running_dev_stack(Path(tmp) / "data", Path(tmp) / "dev.log", env=env) as stack:
                try:
                    result = run(stack.gateway_url, stack.info["orgs"]["acme"], args)
                except Exception:
                    print(stack.logs(), file=sys.stderr)
                    raise
    result = {"machine": machine(), "options": vars(args), **result, "total_seconds": time.perf_counter() - started}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    facts = result["machine"]
    print(f"machine: {facts['cpus']} CPUs ({facts['cpu_model']}), Python {facts['python']}; {facts['date']}")
    print(f"total {result['total_seconds']:.0f} s")
    print(table(result))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the stack is stopped by then (the ``with`` blocks in main)
        print("interrupted; the stack it started is stopped", file=sys.stderr)
        sys.exit(130)
