"""The human-in-the-loop lifecycle over HTTP, end to end, on our control plane and on a hand-written
PostgreSQL queue (bench/baseline_queue.py) with the same load generator:
submit -> claim -> heartbeat -> request approval -> approve -> claim -> complete.

Starts its own stack (``controlplane dev`` in a subprocess: NATS, PostgreSQL, gateway, projector, runner,
notifier) unless ``--dev-json`` points at a running one. ``--system both`` (the default) runs the lifecycle on our
gateway, then on the baseline service, started as a process of its own on a fresh database of the same
PostgreSQL server, while our stack idles. Workers long-poll claims (``block_ms``); an approver follows
ONE event stream (``/v1/events?types=ApprovalRequested``) and approves each request as it appears. The
load generator is aiohttp with pooled connections and orjson, in one process with uvloop.

For each run: tasks/s, submit -> completed p50/p99, where a task's time goes, and the CPU time
(utime + stime from /proc/<pid>/stat) of every process per task: the gateway (the ``controlplane dev``
process itself), its policy workers, the projector, the runner, the notifier, nats-server(s), PostgreSQL
(the postmaster and its children, split by whose sessions they are), the baseline service and the load
generator; any other process of the stack shows as ``other: <program>`` and counts as ours. The stack
is left to settle after it starts, so its start-up work is not measured. Processes are found by
walking the stack's process tree and named by their command line;
a process counts if it is alive at the end of the run (one that started during it counts whole), one
that exited during the run is missed (PostgreSQL backends here live as long as their pools).

    .venv/bin/python bench/lifecycle.py [--system both|ours|baseline] [--tasks 2000] [--workers 4]
        [--in-flight 8] [--cluster 3] [--json results.json]

Tracing's cost: ``--tracing on`` starts the stack with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (spans go to
``--otlp-endpoint``, or to a sink in this process that decodes and counts them); ``--tracing both``
runs the lifecycle without and with tracing, ``--rounds`` times each, alternating, each run on a stack
of its own, and prints the throughput ratio. With tracing the default system is ours alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import orjson
import uvloop
from baseline_queue import DATABASE_URL_ENV, KEYS_ENV
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from controlplane.devstack import Proc, fresh_database, started_by, stop
from controlplane.embedded import free_port
from controlplane.embedded_postgres import database_url_from_env

BASELINE_SERVICE = Path(__file__).with_name("baseline_queue.py")
BASELINE_ROLES = ("submitter", "worker", "approver", "viewer")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TARGET = {"throughput_ratio": 0.5, "cpu_ms_per_task": 15.0, "p99_ms": 100.0}
"""Issue 15's bar for our lifecycle: tasks/s against the baseline's, total CPU per task, p99."""


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- The load generator ------------------------------------------------------------------------------


class Http:
    """One credential's pooled aiohttp session; JSON in and out with orjson; any 4xx/5xx raises."""

    def __init__(self, url: str, key: str) -> None:
        self.session = aiohttp.ClientSession(
            base_url=url,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """The answer's JSON; None for a 204."""
        async with self.session.post(path, data=orjson.dumps(body)) as response:
            raw = await response.read()
            if response.status >= 400:
                raise RuntimeError(f"POST {path} answered {response.status}: {raw[:500]!r}")
            return orjson.loads(raw) if raw else None

    async def get(self, path: str, params: dict[str, str]) -> Any:
        async with self.session.get(path, params=params) as response:
            raw = await response.read()
            if response.status >= 400:
                raise RuntimeError(f"GET {path} answered {response.status}: {raw[:500]!r}")
            return orjson.loads(raw)

    async def close(self) -> None:
        await self.session.close()


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
        self.listening = asyncio.Event()
        """Set at the event stream's first line: from then on no approval request goes unseen."""
        self.background: set[asyncio.Task[None]] = set()
        self.broken = asyncio.Event()
        self.error: BaseException | None = None
        """The first failure of a spawned request."""

    def spawn(self, job: Any) -> None:
        """A request off the main loops (an approval, a read probe); its failure ends the run."""
        task = asyncio.create_task(job)
        self.background.add(task)
        task.add_done_callback(self.settled)

    def settled(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()
            self.broken.set()

    async def submitter(self, http: Http) -> None:
        for i in range(self.total):
            await self.slots.acquire()
            started = time.perf_counter()
            body = {"type": "agent-step", "queue": self.queue, "payload": {"step": i, "tool": "deploy"}}
            task = await http.post("/v1/tasks", body)
            self.submitted_at[task["id"]] = started

    async def worker(self, http: Http, name: str, viewer: Http) -> None:
        while not self.done.is_set():
            claimed = await http.post("/v1/tasks/claim", {"worker_id": name, "queue": self.queue, "block_ms": 1000})
            if claimed is None:
                continue
            task, lease = claimed["task"], claimed["lease"]
            task_id = task["id"]
            body = {"worker_id": name, "lease_id": lease["id"]}
            marks = self.marks.setdefault(task_id, {})
            if not task["approvals"]:
                marks["claimed"] = time.perf_counter()
                await http.post(f"/v1/tasks/{task_id}/heartbeat", body)
                await http.post(f"/v1/tasks/{task_id}/approval-requests", {**body, "reason": "run the deploy tool"})
                marks["asked"] = time.perf_counter()
                continue
            marks["reclaimed"] = time.perf_counter()
            completed = await http.post(f"/v1/tasks/{task_id}/complete", {**body, "result": {"ok": True}})
            self.latencies.append((time.perf_counter() - self.submitted_at[task_id]) * 1000)
            self.completed += 1
            self.slots.release()
            if self.completed % 10 == 0:
                self.spawn(self.measure_read_lag(viewer, completed["seq"]))
            if self.completed == self.total:
                self.done.set()

    async def approver(self, http: Http) -> None:
        """One event stream for all approvals; each approval is decided as its event arrives."""
        params = {"types": "ApprovalRequested", "queue": self.queue}
        async with http.session.get("/v1/events", params=params, timeout=aiohttp.ClientTimeout()) as events:
            events.raise_for_status()
            async for line in events.content:
                self.listening.set()  # both systems open with a comment (": connected") once subscribed
                if line.startswith(b"data: "):
                    self.spawn(self.approve(http, f"{orjson.loads(line[6:])['aggregate_id']}-1"))
        raise RuntimeError("the event stream ended before the run did")

    async def approve(self, http: Http, approval_id: str) -> None:
        await http.post(f"/v1/approvals/{approval_id}/approve", {"comment": "ok"})
        self.marks.setdefault(approval_id.rpartition("-")[0], {})["approved"] = time.perf_counter()

    async def measure_read_lag(self, viewer: Http, seq: int) -> None:
        """How long until a list query (the read model) shows a write: read-your-writes lag."""
        started = time.perf_counter()
        await viewer.get("/v1/tasks", {"queue": self.queue, "limit": "1", "min_seq": str(seq)})
        self.read_lag_ms.append((time.perf_counter() - started) * 1000)

    async def run(self) -> dict[str, float]:
        sessions = {role: Http(self.url, self.keys[role]) for role in ("submitter", "worker", "approver", "viewer")}
        try:
            return await self._run(sessions)
        finally:
            for session in sessions.values():
                await session.close()

    async def _run(self, http: dict[str, Http]) -> dict[str, float]:
        approver = asyncio.create_task(self.approver(http["approver"]))
        await asyncio.wait({approver, asyncio.create_task(self.listening.wait())}, return_when=asyncio.FIRST_COMPLETED)
        started = time.perf_counter()
        lanes = max(1, self.in_flight // self.workers)  # 4 workers x 2 lanes = 8 tasks worked on at once
        jobs = {
            asyncio.create_task(self.worker(http["worker"], f"w{i}", http["viewer"]))
            for i in range(self.workers)
            for _ in range(lanes)
        }
        jobs |= {approver, asyncio.create_task(self.submitter(http["submitter"]))}
        finished = asyncio.create_task(self.done.wait())
        broken = asyncio.create_task(self.broken.wait())
        jobs.add(broken)
        try:
            pending = {finished, *jobs}
            while not finished.done():  # a failed request anywhere ends the run with its error, not a hang
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if self.error is not None:
                    raise self.error
                for job in done:
                    job.result()
            elapsed = time.perf_counter() - started
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, *self.background, return_exceptions=True)
        return self.summary(elapsed)

    def summary(self, elapsed: float) -> dict[str, float]:
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
            "tasks": self.total,
            "seconds": elapsed,
            "tasks_per_second": self.total / elapsed,
            "p50_ms": statistics.median(self.latencies),
            "p99_ms": pct(self.latencies, 0.99),
            **spans,
            "read_lag_p50_ms": statistics.median(self.read_lag_ms) if self.read_lag_ms else float("nan"),
            "read_lag_p99_ms": pct(self.read_lag_ms, 0.99),
        }


# --- Processes and their CPU time ----------------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in clock ticks; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name, in parentheses, may hold spaces
    return int(fields[11]) + int(fields[12])


POSTGRES_SESSION = re.compile(r"postgres: (?P<user>\S+) (?P<database>\S+) (\[local\]|\S+\(\d+\)) ")
"""A backend serving a client: ``postgres: <user> <database> [local] idle`` (or ``<host>(<port>)``)."""


def postgres_role(command: str, baseline_database: str | None) -> str:
    """A PostgreSQL process by whose work it does: ``postgres: <user> <database> <client> <state>``
    for a session, ``postgres: checkpointer`` and the like (and the postmaster) for the server's own."""
    session = POSTGRES_SESSION.match(command)
    if session is None:
        return "postgres: server"
    user, database = session["user"], session["database"]
    if database == baseline_database:
        return "postgres: baseline sessions"
    return {"cp_gateway": "postgres: gateway sessions", "cp_projector": "postgres: projector sessions"}.get(
        user, "postgres: other sessions"
    )


def role_of(pid: int, root: int, baseline_pid: int | None, baseline_database: str | None) -> str:
    command = cmdline(pid)
    program = Path(command.split(" ", 1)[0]).name if command else ""
    if pid == os.getpid():
        return "load generator"
    if pid == baseline_pid:
        return "baseline service"
    if pid == root:
        return "gateway"
    if "policies_wasm.worker" in command:
        return "gateway: policy workers"
    if "controlplane projector" in command:
        return "projector"
    if "controlplane runner" in command:
        return "runner"
    if "controlplane notify" in command:
        return "notifier"
    if program == "nats-server":
        return "nats-server"
    if program == "postgres" or command.startswith("postgres:"):
        return postgres_role(command, baseline_database)
    return f"other: {program}"


def listening_pid(port: int) -> int:
    """The process listening on a local TCP port: its socket's inode in /proc/net/tcp*, then the process
    holding that inode. How a running stack given by ``--dev-json`` is found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    return int(entry.name)
    raise RuntimeError(f"no process of ours listens on port {port}: is the stack of --dev-json running?")


@dataclass
class Stack:
    """Our control plane, running: what dev.json says, and where its processes are."""

    info: dict[str, Any]
    root: int
    """The ``controlplane dev`` process: the gateway; the projector, runner and nats-server are its children."""
    data_dir: Path
    """The embedded PostgreSQL's command line names it (that daemon's parent is init)."""
    baseline_pid: int | None = None
    baseline_database: str | None = None

    def processes(self) -> dict[Proc, str]:
        """Every process of the stack (and of the baseline service and this load generator), by role."""
        found = started_by(self.root, self.data_dir) | {
            proc for proc in (proc_of(self.root), proc_of(os.getpid()), proc_of(self.baseline_pid)) if proc
        }
        return {proc: role_of(proc.pid, self.root, self.baseline_pid, self.baseline_database) for proc in found}

    def describe(self) -> str:
        lines = [f"  {role:<30} pid {proc.pid:<7} {cmdline(proc.pid)[:110]}" for proc, role in self.processes().items()]
        return "\n".join(sorted(lines))


def proc_of(pid: int | None) -> Proc | None:
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return Proc(pid, int(raw[raw.rindex(")") + 2 :].split()[19]))


@dataclass
class CpuWindow:
    """CPU time of every process of the stack between two samples, by role; and how busy the rest of the
    machine was meanwhile (other sessions' tests share these cores: the noise in a run's numbers)."""

    stack: Stack
    before: dict[Proc, int] = field(default_factory=dict)
    machine_before: int = 0
    started: float = 0.0
    others_cores: float = 0.0
    """Cores' worth of CPU spent outside the measured processes during the window."""

    def start(self) -> None:
        self.before = {proc: ticks for proc in self.stack.processes() if (ticks := cpu_ticks(proc.pid)) is not None}
        self.machine_before, self.started = machine_busy_ticks(), time.monotonic()

    def stop(self) -> dict[str, float]:
        """Milliseconds of CPU per role since ``start``: a process that started since counts whole."""
        spent: dict[str, float] = {}
        for proc, role in self.stack.processes().items():
            ticks = cpu_ticks(proc.pid)
            if ticks is not None:
                spent[role] = spent.get(role, 0.0) + (ticks - self.before.get(proc, 0)) * 1000 / CLOCK_TICKS
        machine_ms = (machine_busy_ticks() - self.machine_before) * 1000 / CLOCK_TICKS
        self.others_cores = max(0.0, machine_ms - sum(spent.values())) / 1000 / (time.monotonic() - self.started)
        return spent


def settle(stack: Stack, within: float = 30.0) -> None:
    """Wait until the stack idles (below a tenth of a core for half a second), so start-up work (the
    runner registering, the notifier and projector catching up) is not billed to the first run."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        window = CpuWindow(stack)
        window.start()
        time.sleep(0.5)
        busy = sum(ms for role, ms in window.stop().items() if role != "load generator")
        if busy < 50:
            return


def machine_busy_ticks() -> int:
    """Clock ticks all cores spent busy since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))


# --- The two systems ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A system the lifecycle runs on: where it answers, a key per role, and which processes are its."""

    system: str
    url: str
    keys: dict[str, str]
    counts: Roles
    """The roles (see ``role_of``) whose CPU is this system's; the others idle through its run."""


@dataclass(frozen=True)
class Roles:
    """Which roles' CPU is a system's: those named, or (``all_but``) every role except those named."""

    names: frozenset[str]
    all_but: bool = False

    def __contains__(self, role: object) -> bool:
        return (role in self.names) != self.all_but


BASELINE_ONLY = frozenset({"baseline service", "postgres: baseline sessions"})
BASELINE_COUNTS = Roles(BASELINE_ONLY | {"postgres: server", "load generator"})
OURS_COUNTS = Roles(BASELINE_ONLY, all_but=True)
"""Every process of our stack, also one this bench has no name for (shown as ``other: <program>``)."""


@contextlib.contextmanager
def ours(stack: Stack, log_dir: Path) -> Iterator[Target]:
    """Our gateway, as the stack serves it, with the dev org acme's keys."""
    yield Target("ours", stack.info["gateway_url"], stack.info["orgs"]["acme"], OURS_COUNTS)


@contextlib.contextmanager
def baseline(stack: Stack, log_dir: Path) -> Iterator[Target]:
    """The baseline service on a fresh database of the stack's PostgreSQL server, its process and its
    database's sessions measured with the stack's."""
    with baseline_service(stack.info["database_url"], log_dir) as (target, pid, database):
        stack.baseline_pid, stack.baseline_database = pid, database
        print(f"  {'baseline service':<30} pid {pid:<7} database {database}", flush=True)
        try:
            yield target
        finally:
            stack.baseline_pid = None


@contextlib.contextmanager
def baseline_service(server_url: str, log_dir: Path) -> Iterator[tuple[Target, int, str]]:
    """bench/baseline_queue.py as a process of its own, on a fresh database of ``server_url``'s server,
    with a new key per role for org acme: (its target, its pid, its database). Stopped and its database
    dropped at the end."""
    keys = {role: secrets.token_urlsafe(24) for role in BASELINE_ROLES}
    with fresh_database(server_url, prefix="baseline") as database_url:
        port = free_port()
        env = {
            **os.environ,
            KEYS_ENV: json.dumps({key: ["acme", role] for role, key in keys.items()}),
            DATABASE_URL_ENV: database_url,  # not in arguments, which every local user can read
        }
        with (log_dir / "baseline.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, str(BASELINE_SERVICE), "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, process, log_dir / "baseline.log")
            target = Target("baseline", url, keys, BASELINE_COUNTS)
            yield target, process.pid, urlsplit(database_url).path.lstrip("/")
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


SYSTEMS = {"ours": ours, "baseline": baseline}


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=2, trust_env=False) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{url}/healthz").status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"the baseline service did not start; {log_path}:\n{log_path.read_text()[-3000:]}")


# --- Our stack -----------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def our_stack(args: argparse.Namespace, otlp_endpoint: str | None) -> Iterator[Stack]:
    """The stack of ``--dev-json``, or ``controlplane dev`` started here on a temporary data dir (on a
    fresh database of ``DATABASE_URL``'s server when that is set), stopped with all it started."""
    if args.dev_json is not None:
        info = json.loads(args.dev_json.read_text())
        port = int(info["gateway_url"].rsplit(":", 1)[1])
        yield Stack(info, listening_pid(port), args.dev_json.parent.resolve())
        return
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as cleanup:
        data_dir = Path(tmp)
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_EXPORTER_OTLP")}
        if otlp_endpoint is not None:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
        if (server_url := database_url_from_env()) is not None:
            env["DATABASE_URL"] = cleanup.enter_context(fresh_database(server_url, prefix="lifecycle"))
        process = start_stack(data_dir, free_port(), args.cluster, env)
        started: set[Proc] = set()
        try:
            started |= started_by(process.pid, data_dir)
            yield Stack(json.loads((data_dir / "dev.json").read_text()), process.pid, data_dir)
        finally:
            started |= started_by(process.pid, data_dir)
            stop(process, started, data_dir / "dev.log")


def start_stack(data_dir: Path, port: int, cluster: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    controlplane = Path(sys.executable).parent / "controlplane"
    process = subprocess.Popen(
        [str(controlplane), "dev", "--port", str(port), "--data-dir", str(data_dir), "--cluster", str(cluster)],
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "dev.log", "wb"),  # noqa: SIM115
        start_new_session=True,
        env=env,
    )
    deadline = time.monotonic() + 90
    while not (data_dir / "dev.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not start; see {data_dir / 'dev.log'}")
        time.sleep(0.2)
    return process


# --- One run, and the report ---------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    system: str
    tracing: bool
    metrics: dict[str, float]
    cpu_ms: dict[str, float]
    """CPU milliseconds per task, by role, of every process measured (the other system's too)."""
    counts: Roles
    load_before: float
    others_cores: float

    @property
    def cpu_total(self) -> float:
        return sum(ms for role, ms in self.cpu_ms.items() if role in self.counts)

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "system": self.system,
            "tracing": self.tracing,
            **self.metrics,
            "cpu_ms_per_task": {role: ms for role, ms in self.cpu_ms.items() if role in self.counts},
            "cpu_ms_per_task_total": self.cpu_total,
            "idle_others_cpu_ms_per_task": {role: ms for role, ms in self.cpu_ms.items() if role not in self.counts},
            "load_average_before": self.load_before,
            "other_processes_busy_cores": self.others_cores,
        }


def measure(target: Target, stack: Stack, args: argparse.Namespace, traced: bool) -> Run:
    load_before = os.getloadavg()[0]
    window = CpuWindow(stack)
    bench = Lifecycle(target.url, target.keys, args.tasks, args.workers, args.in_flight)
    window.start()
    metrics = uvloop.run(bench.run())
    spent = window.stop()
    label = target.system + (f", tracing {'on' if traced else 'off'}" if args.tracing != "off" else "")
    cpu_ms = {role: ms / args.tasks for role, ms in spent.items()}
    run = Run(label, target.system, traced, metrics, cpu_ms, target.counts, load_before, window.others_cores)
    print(
        f"{label}: {metrics['tasks_per_second']:,.1f} tasks/s, p50/p99 {metrics['p50_ms']:,.1f}/"
        f"{metrics['p99_ms']:,.1f} ms, {run.cpu_total:,.1f} CPU ms/task",
        flush=True,
    )
    return run


def report(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"tasks={args.tasks} workers={args.workers} in_flight={args.in_flight} nats_servers={args.cluster}")
    header = "| metric | " + " | ".join(run.label for run in runs) + " |\n|---|" + "---|" * len(runs)
    print(header)
    for key in runs[0].metrics:
        print(f"| {key} | " + " | ".join(f"{run.metrics.get(key, float('nan')):,.1f}" for run in runs) + " |")
    print("| load average before | " + " | ".join(f"{run.load_before:.2f}" for run in runs) + " |")
    print("| cores busy outside these processes | " + " | ".join(f"{run.others_cores:.2f}" for run in runs) + " |")
    print("\nCPU ms per task (utime+stime from /proc; a process idling through another system's run in brackets):")
    print(header.replace("metric", "process"))
    roles = sorted({role for run in runs for role in run.cpu_ms}, key=role_order)
    for role in roles:
        print(f"| {role} | " + " | ".join(cpu_cell(run, role) for run in runs) + " |")
    print("| **total** | " + " | ".join(f"**{run.cpu_total:,.1f}**" for run in runs) + " |")
    summary: dict[str, Any] = {"runs": [run.as_json() for run in runs]}
    if args.tracing == "both":
        off = statistics.mean(r.metrics["tasks_per_second"] for r in runs if r.system == "ours" and not r.tracing)
        on = statistics.mean(r.metrics["tasks_per_second"] for r in runs if r.system == "ours" and r.tracing)
        print(f"throughput with tracing on / off: {on:,.1f} / {off:,.1f} = {on / off:.3f} (cost {1 - on / off:.1%})")
        summary["tracing_on_off_ratio"] = on / off
    compared = [r for r in runs if r.system == "ours" and not r.tracing], [r for r in runs if r.system == "baseline"]
    if all(compared):
        summary["ours_vs_baseline"] = compare(*compared)
    return summary


def cpu_cell(run: Run, role: str) -> str:
    if role not in run.cpu_ms:
        return "-"
    return f"{run.cpu_ms[role]:,.2f}" if role in run.counts else f"({run.cpu_ms[role]:,.2f})"


ROLE_ORDER = ("gateway", "projector", "runner", "notifier", "nats-server", "postgres", "baseline")


def role_order(role: str) -> tuple[int, str]:
    """The report's rows: our processes, PostgreSQL's, the baseline's, then anything else."""
    return next((i for i, prefix in enumerate(ROLE_ORDER) if role.startswith(prefix)), len(ROLE_ORDER)), role


def compare(ours_runs: list[Run], baseline_runs: list[Run]) -> dict[str, float]:
    """Ours against the baseline (means over runs) and against issue 15's bar; printed and returned."""

    def mean(runs: list[Run], key: str) -> float:
        return statistics.mean(run.metrics[key] for run in runs)

    ours_tps, baseline_tps = mean(ours_runs, "tasks_per_second"), mean(baseline_runs, "tasks_per_second")
    ours_cpu = statistics.mean(run.cpu_total for run in ours_runs)
    baseline_cpu = statistics.mean(run.cpu_total for run in baseline_runs)
    ours_p99 = mean(ours_runs, "p99_ms")
    ratios = {
        "throughput_ratio": ours_tps / baseline_tps,
        "cpu_per_task_ratio": ours_cpu / baseline_cpu,
        "p99_ratio": ours_p99 / mean(baseline_runs, "p99_ms"),
    }
    print(
        f"\nours / baseline: tasks/s {ours_tps:,.1f} / {baseline_tps:,.1f} = **{ratios['throughput_ratio']:.2f}x**; "
        f"CPU per task {ours_cpu:,.1f} / {baseline_cpu:,.1f} ms = **{ratios['cpu_per_task_ratio']:.2f}x**; "
        f"p99 {ours_p99:,.1f} / {mean(baseline_runs, 'p99_ms'):,.1f} ms = {ratios['p99_ratio']:.2f}x"
    )
    checks = {
        f"tasks/s >= {TARGET['throughput_ratio']}x baseline": ratios["throughput_ratio"] >= TARGET["throughput_ratio"],
        f"CPU <= {TARGET['cpu_ms_per_task']:.0f} ms/task": ours_cpu <= TARGET["cpu_ms_per_task"],
        f"p99 <= {TARGET['p99_ms']:.0f} ms": ours_p99 <= TARGET["p99_ms"],
    }
    print("issue 15's bar: " + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in checks.items()))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("both", "ours", "baseline"), help="default: both (ours with --tracing)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--dev-json", type=Path, help="use a running stack described by this dev.json")
    parser.add_argument("--cluster", type=int, default=1, help="nats-servers in the stack's JetStream cluster (R=N)")
    parser.add_argument("--tracing", choices=("off", "on", "both"), default="off", help="OpenTelemetry in the stack")
    parser.add_argument("--otlp-endpoint", help="where spans go with tracing on (default: a counting sink here)")
    parser.add_argument("--rounds", type=int, default=1, help="with --tracing both: off/on pairs to run")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    if args.tracing != "off" and args.dev_json is not None:
        parser.error("--tracing needs a stack of the benchmark's own (no --dev-json)")
    system = args.system or ("ours" if args.tracing != "off" else "both")
    systems = ["ours", "baseline"] if system == "both" else [system]
    sink = SpanSink() if args.tracing != "off" and args.otlp_endpoint is None else None
    endpoint = args.otlp_endpoint or (sink.url if sink else None)
    modes = {"off": [False], "on": [True], "both": [False, True] * args.rounds}[args.tracing]
    runs: list[Run] = []
    for traced in modes:
        with our_stack(args, endpoint if traced else None) as stack, tempfile.TemporaryDirectory() as logs:
            print("processes measured:\n" + stack.describe(), flush=True)
            settle(stack)
            for name in systems:
                spans_before = sink.spans if sink else 0
                with SYSTEMS[name](stack, Path(logs)) as target:
                    runs.append(measure(target, stack, args, traced))
                if sink is not None and traced:
                    time.sleep(6)  # the stack's last batch of spans (exported every 5 s) has reached the sink
                    runs[-1].metrics["spans_exported"] = sink.spans - spans_before
    if sink is not None:
        sink.close()
    summary = report(runs, args)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
