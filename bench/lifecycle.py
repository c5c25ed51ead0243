"""The human-in-the-loop lifecycle over HTTP, end to end:
submit -> claim -> heartbeat -> request approval -> approve -> claim -> complete.

Starts its own stack (``controlplane dev`` in a subprocess: NATS, PostgreSQL, projector, gateway) unless
``--url`` and ``--dev-json`` point at a running one. Workers long-poll claims; an approver follows the
org's event stream and approves each request as it appears.

    .venv/bin/python bench/lifecycle.py [--tasks 2000] [--workers 4] [--in-flight 8] [--cluster 3]

Tracing's cost: ``--tracing on`` starts the stack with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (spans go to
``--otlp-endpoint``, or to a sink in this process that decodes and counts them); ``--tracing both``
runs the lifecycle without and with tracing, ``--rounds`` times each, alternating, each run on a stack
of its own, and prints the throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import uvloop
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from core.embedded import free_port


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Lifecycle:
    def __init__(self, url: str, keys: dict[str, str], tasks: int, workers: int, in_flight: int) -> None:
        self.url, self.keys = url, keys
        self.total, self.workers, self.in_flight = tasks, workers, in_flight
        self.queue = f"bench{int(time.time())}"
        self.submitted_at: dict[str, float] = {}
        self.marks: dict[str, dict[str, float]] = {}
        """Per task, when each step finished: where the time goes."""
        self.latencies: list[float] = []
        self.read_lag_ms: list[float] = []
        self.done = asyncio.Event()
        self.slots = asyncio.Semaphore(in_flight)
        self.completed = 0
        self.probes: set[asyncio.Task[None]] = set()

    def client(self, role: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.keys[role]}"},
            timeout=60,
            limits=httpx.Limits(max_connections=64),
        )

    async def submitter(self) -> None:
        async with self.client("submitter") as c:
            for i in range(self.total):
                await self.slots.acquire()
                started = time.perf_counter()
                r = await c.post(
                    "/v1/tasks",
                    json={"type": "agent-step", "queue": self.queue, "payload": {"step": i, "tool": "deploy"}},
                )
                r.raise_for_status()
                self.submitted_at[r.json()["id"]] = started

    async def worker(self, name: str) -> None:
        async with self.client("worker") as c:
            while not self.done.is_set():
                r = await c.post("/v1/tasks/claim", json={"worker_id": name, "queue": self.queue, "block_ms": 1000})
                if r.status_code == 204:
                    continue
                r.raise_for_status()
                claimed = r.json()
                task, lease = claimed["task"], claimed["lease"]
                body = {"worker_id": name, "lease_id": lease["id"]}
                marks = self.marks.setdefault(task["id"], {})
                if not task["approvals"]:
                    marks["claimed"] = time.perf_counter()
                    (await c.post(f"/v1/tasks/{task['id']}/heartbeat", json=body)).raise_for_status()
                    asked = {**body, "reason": "run the deploy tool"}
                    (await c.post(f"/v1/tasks/{task['id']}/approval-requests", json=asked)).raise_for_status()
                    marks["asked"] = time.perf_counter()
                    continue
                marks["reclaimed"] = time.perf_counter()
                r = await c.post(f"/v1/tasks/{task['id']}/complete", json={**body, "result": {"ok": True}})
                r.raise_for_status()
                self.latencies.append((time.perf_counter() - self.submitted_at[task["id"]]) * 1000)
                self.completed += 1
                self.slots.release()
                if self.completed % 10 == 0:
                    probe = asyncio.create_task(self.measure_read_lag(r.json()["seq"]))
                    self.probes.add(probe)
                    probe.add_done_callback(self.probes.discard)
                if self.completed == self.total:
                    self.done.set()

    async def approver(self) -> None:
        async with (
            self.client("approver") as c,
            c.stream("GET", "/v1/events", params={"types": "ApprovalRequested", "queue": self.queue}) as events,
        ):
            pending: set[asyncio.Task[None]] = set()
            async for line in events.aiter_lines():
                if line.startswith("data: "):
                    approval_id = f"{json.loads(line[6:])['aggregate_id']}-1"
                    job = asyncio.create_task(self.approve(c, approval_id))
                    pending.add(job)
                    job.add_done_callback(pending.discard)
                if self.done.is_set():
                    return

    async def approve(self, c: httpx.AsyncClient, approval_id: str) -> None:
        (await c.post(f"/v1/approvals/{approval_id}/approve", json={"comment": "ok"})).raise_for_status()
        self.marks.setdefault(approval_id.rpartition("-")[0], {})["approved"] = time.perf_counter()

    async def measure_read_lag(self, seq: int) -> None:
        """How long until a list query (the read model) shows a write: read-your-writes lag."""
        started = time.perf_counter()
        async with self.client("viewer") as c:
            (await c.get("/v1/tasks", params={"queue": self.queue, "limit": 1, "min_seq": seq})).raise_for_status()
        self.read_lag_ms.append((time.perf_counter() - started) * 1000)

    async def run(self) -> dict[str, float]:
        started = time.perf_counter()
        approver = asyncio.create_task(self.approver())
        await asyncio.sleep(0.3)
        lanes = max(1, self.in_flight // self.workers)  # 4 workers x 2 lanes = 8 tasks worked on at once
        jobs = [asyncio.create_task(self.worker(f"w{i}")) for i in range(self.workers) for _ in range(lanes)]
        await self.submitter()
        await self.done.wait()
        elapsed = time.perf_counter() - started
        approver.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        phases = {
            "submit->claimed": ("submitted", "claimed"),
            "claimed->asked": ("claimed", "asked"),
            "asked->approved": ("asked", "approved"),
            "approved->reclaimed": ("approved", "reclaimed"),
        }
        for task_id, started_at in self.submitted_at.items():
            self.marks.setdefault(task_id, {})["submitted"] = started_at
        spans = {
            f"{name} p{q} ms": pct([(m[b] - m[a]) * 1000 for m in self.marks.values() if a in m and b in m], q / 100)
            for name, (a, b) in phases.items()
            for q in (50, 99)
        }
        return {
            **spans,
            "tasks": self.total,
            "seconds": elapsed,
            "tasks_per_second": self.total / elapsed,
            "p50_ms": statistics.median(self.latencies),
            "p99_ms": pct(self.latencies, 0.99),
            "read_lag_p50_ms": statistics.median(self.read_lag_ms) if self.read_lag_ms else float("nan"),
            "read_lag_p99_ms": pct(self.read_lag_ms, 0.99),
        }


class SpanSink:
    """An OTLP/HTTP endpoint that decodes what it gets and counts the spans, on a thread of its own."""

    def __init__(self) -> None:
        self.spans = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def start_stack(
    data_dir: Path, port: int, cluster: int = 1, otlp_endpoint: str | None = None
) -> subprocess.Popen[bytes]:
    controlplane = Path(sys.executable).parent / "controlplane"
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_EXPORTER_OTLP")}
    if otlp_endpoint is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
    process = subprocess.Popen(
        [str(controlplane), "dev", "--port", str(port), "--data-dir", str(data_dir), "--cluster", str(cluster)],
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "dev.log", "wb"),  # noqa: SIM115
        start_new_session=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not (data_dir / "dev.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not start; see {data_dir / 'dev.log'}")
        time.sleep(0.2)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--dev-json", type=Path, help="use a running stack described by this dev.json")
    parser.add_argument("--cluster", type=int, default=1, help="nats-servers in the stack's JetStream cluster (R=N)")
    parser.add_argument("--tracing", choices=("off", "on", "both"), default="off", help="OpenTelemetry in the stack")
    parser.add_argument("--otlp-endpoint", help="where spans go with tracing on (default: a counting sink here)")
    parser.add_argument("--rounds", type=int, default=1, help="with --tracing both: off/on pairs to run")
    args = parser.parse_args()
    if args.tracing != "off" and args.dev_json is not None:
        parser.error("--tracing needs a stack of the benchmark's own (no --dev-json)")
    sink = SpanSink() if args.tracing != "off" and args.otlp_endpoint is None else None
    endpoint = args.otlp_endpoint or (sink.url if sink else None)
    modes = {"off": [False], "on": [True], "both": [False, True] * args.rounds}[args.tracing]
    results: list[tuple[str, dict[str, float]]] = []
    for traced in modes:
        spans_before = sink.spans if sink else 0
        result = run_once(args, endpoint if traced else None)
        if sink is not None and traced:
            time.sleep(6)  # the stack's last batch of spans (exported every 5 s) has reached the sink
            result["spans_exported"] = sink.spans - spans_before
        results.append(("on" if traced else "off", result))
    if sink is not None:
        sink.close()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"tasks={args.tasks} workers={args.workers} in_flight={args.in_flight} nats_servers={args.cluster}")
    print("| metric | " + " | ".join(f"tracing {mode}" for mode, _ in results) + " |")
    print("|---|" + "---|" * len(results))
    for key in results[0][1]:
        print(f"| {key} | " + " | ".join(f"{result.get(key, float('nan')):,.1f}" for _, result in results) + " |")
    if args.tracing == "both":
        off = statistics.mean(r["tasks_per_second"] for mode, r in results if mode == "off")
        on = statistics.mean(r["tasks_per_second"] for mode, r in results if mode == "on")
        print(f"throughput with tracing on / off: {on:,.1f} / {off:,.1f} = {on / off:.3f} (cost {1 - on / off:.1%})")


def run_once(args: argparse.Namespace, otlp_endpoint: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        process = None
        dev_json = args.dev_json
        if dev_json is None:
            process = start_stack(Path(tmp), free_port(), args.cluster, otlp_endpoint)
            dev_json = Path(tmp) / "dev.json"
        info = json.loads(dev_json.read_text())
        try:
            bench = Lifecycle(info["gateway_url"], info["orgs"]["acme"], args.tasks, args.workers, args.in_flight)
            return uvloop.run(bench.run())
        finally:
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(60)


if __name__ == "__main__":
    main()
