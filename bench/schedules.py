"""Schedules benchmark (issue 16): ``--schedules`` cron schedules (default 1,000) that all fire at the
same second of every minute, for ``--rounds`` minutes: how late each fire runs, and the CPU per fire.

Everything real, on one machine: a nats-server and a PostgreSQL this benchmark starts, and in this
process the gateway's services with their scheduler (what ``controlplane gateway`` runs). Each fire is
the whole path: the message schedule fires ``ScheduleFired`` into the schedule's subject, the
scheduler's durable consumer delivers it, the schedule is read from the log, the previous run's task
is looked up, the task is submitted through the submit path (environments, the submit policy), and
the run is recorded (which arms the next fire). Every schedule fires at the same second: the worst
case for lateness, a burst of ``--schedules`` fires at once; ``--spread`` gives schedule n the second
n mod 60 instead (the same fires per minute, evenly spread).

Lateness is measured from the cron time to the run being recorded (the scheduler's own samples) and
to the task's ``TaskSubmitted`` in the log. CPU per fire is the CPU time over the firing windows,
divided by the fires run, of this process (gateway + scheduler), its submit policy's worker processes,
the nats-server and PostgreSQL; messages per fire are the nats-server's (``/varz``: in + out).

    .venv/bin/python bench/schedules.py [--schedules 1000] [--rounds 2] [--spread]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import uvloop

from controlplane.cli import settle_heap
from controlplane.embedded import EmbeddedNats
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.seed import seed_org
from core.domain.commands import SYSTEM, CreateSchedule
from core.domain.events import TaskSubmitted
from core.domain.ids import new_id
from core.domain.schedules import run_task_id
from core.domain.subjects import aggregate_subject
from gateway.factory import GatewaySettings, close_services, open_services

ORG = "bench"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def nats_process(port: int) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "nats-server" in cmdline:
            try:
                if any(c.laddr.port == port for c in process.net_connections(kind="tcp")):
                    return process
            except psutil.Error:
                continue
    raise RuntimeError("the benchmark's nats-server was not found")


def cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:  # a policy worker that stopped: its CPU is gone with it
        return 0.0
    return times.user + times.system


def policy_workers(own: psutil.Process) -> list[psutil.Process]:
    return [child for child in own.children(recursive=True) if "policies_wasm.worker" in " ".join(child.cmdline())]


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "postgres" in cmdline and str(data_dir) in cmdline:
            found.append(process)
            found.extend(process.children(recursive=True))
    return found


def nats_messages(monitor_url: str) -> int:
    with urllib.request.urlopen(f"{monitor_url}/varz", timeout=5) as response:
        varz = json.load(response)
    return int(varz["in_msgs"]) + int(varz["out_msgs"])


async def run(schedules: int, rounds: int, spread: bool, data_dir: Path) -> None:
    with EmbeddedNats(data_dir / "nats") as nats_server, EmbeddedPostgres(data_dir / "postgres") as postgres:
        server = nats_process(nats_server.port)
        svc = await open_services(GatewaySettings(nats_url=nats_server.url, database_url=postgres.dsn))
        assert svc.scheduler is not None
        try:
            await seed_org(svc.handler, ORG, ("admin",))
            # All fire at one second of the minute, at least 15 s from now (creating them takes a while).
            second = (datetime.now(UTC) + timedelta(seconds=15)).second
            ids = [f"s{n:05d}-{new_id()[-6:]}" for n in range(schedules)]
            crons = {
                schedule_id: f"{(second + n % 60) % 60 if spread else second} * * * * *"
                for n, schedule_id in enumerate(ids)
            }
            cron = "<second spread over the minute> * * * * *" if spread else crons[ids[0]]
            task = {"type": "report", "queue": "scheduled", "payload": {"bench": True}}
            started = time.perf_counter()
            semaphore = asyncio.Semaphore(128)

            async def create(schedule_id: str) -> None:
                async with semaphore:
                    cron_of = crons[schedule_id]
                    command = CreateSchedule(schedule_id=schedule_id, cron=cron_of, task=task, overlap="allow")
                    await svc.handler.handle(ORG, command, actor=SYSTEM)

            await asyncio.gather(*(create(schedule_id) for schedule_id in ids))
            print(f"created {schedules} schedules with cron {cron!r} in {time.perf_counter() - started:.1f} s")
            first_fire = (await svc.handler.load(ORG, "schedule", ids[0]))[0].next_fire_at
            fire_times = [first_fire + timedelta(minutes=r) for r in range(rounds)]
            due_of = {  # each schedule's fires, for reading its tasks back
                schedule_id: [
                    (await svc.handler.load(ORG, "schedule", schedule_id))[0].next_fire_at + timedelta(minutes=r)
                    for r in range(rounds)
                ]
                for schedule_id in ids[:: max(1, schedules // 200)]
            }
            own = psutil.Process(os.getpid())
            cpu = dict.fromkeys(("gateway+scheduler", "policy workers", "nats-server", "postgresql"), 0.0)
            messages = 0

            def snapshot() -> dict[str, dict[int, float]]:
                return {
                    "gateway+scheduler": {own.pid: cpu_seconds(own)},
                    "policy workers": {worker.pid: cpu_seconds(worker) for worker in policy_workers(own)},
                    "nats-server": {server.pid: cpu_seconds(server)},
                    "postgresql": {pg.pid: cpu_seconds(pg) for pg in postgres_processes(data_dir / "postgres")},
                }

            for due in fire_times:
                await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() - 1))
                before, runs_before = snapshot(), svc.scheduler.runs
                messages_before = nats_messages(nats_server.monitor_url)
                deadline = time.monotonic() + (70 if spread else 30)
                while svc.scheduler.runs < runs_before + schedules and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                for name, after in snapshot().items():
                    cpu[name] += sum(seconds - before[name].get(pid, 0.0) for pid, seconds in after.items())
                messages += nats_messages(nats_server.monitor_url) - messages_before
                done = svc.scheduler.runs - runs_before
                print(f"fire at {due.isoformat()}: {done} of {schedules} runs recorded")
            recorded = list(svc.scheduler.lateness)
            submitted: list[float] = []
            for schedule_id, dues in due_of.items():  # a sample of the tasks, read from the log
                for due in dues:
                    task_id = run_task_id(ORG, schedule_id, 1, due)
                    history = await svc.store.read_subject(aggregate_subject(ORG, "task", task_id))
                    if history and isinstance(history[0].event, TaskSubmitted):
                        submitted.append((history[0].event.at - due).total_seconds())
            fires = svc.scheduler.runs
        finally:
            await close_services(svc)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    when = "their seconds spread over the minute" if spread else "all at the same second"
    print(f"fires run: {fires} ({schedules} schedules x {rounds} rounds, {when})")
    for name, samples in (("recorded", recorded), ("task submitted (sample)", submitted)):
        if samples:
            print(
                f"lateness to {name}: p50 {pct(samples, 50) * 1000:.0f} ms, p99 {pct(samples, 99) * 1000:.0f} ms,"
                f" max {max(samples) * 1000:.0f} ms, mean {statistics.fmean(samples) * 1000:.0f} ms (n={len(samples)})"
            )
    if fires:
        by_process = ", ".join(f"{name} {seconds / fires * 1000:.2f}" for name, seconds in cpu.items())
        print(f"CPU per fire (ms): {by_process}; all {sum(cpu.values()) / fires * 1000:.2f}")
        print(f"NATS messages per fire (in + out): {messages / fires:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="minutes of fires to measure")
    parser.add_argument("--spread", action="store_true", help="spread the schedules' second over the minute")
    args = parser.parse_args()
    settle_heap()  # as `controlplane gateway` does once started
    with tempfile.TemporaryDirectory(prefix="cp-bench-schedules-") as directory:
        uvloop.run(run(args.schedules, args.rounds, args.spread, Path(directory)))  # as `controlplane gateway` runs


if __name__ == "__main__":
    main()
