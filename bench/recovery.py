"""Crash recovery of in-flight workflows: 200 tasks are held by one runner, each inside a step, when
that runner is killed with SIGKILL; a new runner is started at once. Reported, from the log:

- how long after the kill each task was claimed again (resumed) and recorded its interrupted step
  (progressed); the target is every task resumed within the lease time + 1 s;
- lost: tasks that never completed; duplicated: steps that ran again after their result was recorded, journal
  positions recorded twice, tasks completed twice. Both must be 0.

With ``--restart`` the killed runner itself is started again, under its own worker id: it registers as a
new incarnation, which releases the leases its killed process held at once (``TaskLeaseReleased``), so
nothing waits for a lease to run out; the target is every task resumed within 0.5 s of that registration.

Starts its own stack (``controlplane dev``) unless ``--dev-json`` points at a running one.

    .venv/bin/python bench/recovery.py [--tasks 200] [--lease-seconds 5] [--restart]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvloop
from lifecycle import pct, start_stack

from controlplane.embedded import free_port
from core.domain.events import (
    TaskClaimed,
    TaskCompleted,
    TaskLeaseExpired,
    TaskLeaseReleased,
    WorkerRegistered,
    WorkflowOperationRecorded,
)
from core.domain.records import RecordedEvent
from core.log.store import JetStreamEventStore

BENCH_DIR = Path(__file__).resolve().parent
RESTART_TARGET_SECONDS = 0.5


def start_runner(
    info: dict[str, Any], queue: str, name: str, sink: Path, lease: float, tasks: int, *, hang: bool, worker_id: str
) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).parent / "controlplane"), "runner", "--url", info["gateway_url"]]
    command += ["--queue", queue, "--worker-id", worker_id]
    command += ["--workflows", "recovery_workflows:ALL", "--lease-seconds", str(lease), "--concurrency", str(tasks)]
    environment = {**os.environ, "PYTHONPATH": str(BENCH_DIR), "CP_RECOVERY_SINK": str(sink)}
    environment["CP_WORKER_KEY"] = info["orgs"]["acme"]["worker"]
    if hang:
        environment["CP_RECOVERY_HANG"] = "1"
    log = (sink.parent / f"{name}.log").open("wb")
    return subprocess.Popen(command, stdout=log, stderr=log, env=environment, start_new_session=True)


async def wait_until(check: Callable[[], bool], within: float, every: float = 0.05) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 (the runner writes a file: there is nothing to wait on but time)
            await asyncio.sleep(every)


async def run(info: dict[str, Any], tasks: int, lease: float, work_dir: Path, *, restart: bool) -> dict[str, float]:
    queue = f"recovery{int(time.time())}"
    sink = work_dir / "effects.log"
    sink.touch()
    headers = {"Authorization": f"Bearer {info['orgs']['acme']['submitter']}"}
    async with httpx.AsyncClient(base_url=info["gateway_url"], headers=headers, timeout=30) as client:
        body = {"type": "recovery", "queue": queue, "workflow": {"name": "recovery", "version": 1}}
        ids = [(await client.post("/v1/tasks", json=body)).raise_for_status().json()["id"] for _ in range(tasks)]

    def lines() -> list[str]:
        return sink.read_text().splitlines()

    doomed = start_runner(info, queue, "doomed", sink, lease, tasks, hang=True, worker_id="doomed")
    await wait_until(lambda: sum(line.startswith("started work") for line in lines()) >= tasks, within=120)
    store = await JetStreamEventStore.connect(info["nats_url"])
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.time()
    doomed.wait()
    heir_id = "doomed" if restart else "heir"  # the same worker id: a new incarnation of it
    heir = start_runner(info, queue, "heir", sink, lease, tasks, hang=False, worker_id=heir_id)
    try:
        try:
            histories: dict[str, list[RecordedEvent]] = {}

            async def all_completed() -> bool:
                for task_id in ids:
                    if task_id not in histories or not isinstance(histories[task_id][-1].event, TaskCompleted):
                        histories[task_id] = await store.read_subject(f"cp.acme.task.{task_id}")
                return all(isinstance(h[-1].event, TaskCompleted) for h in histories.values())

            deadline = time.monotonic() + lease * 4 + 60
            while not await all_completed() and time.monotonic() < deadline:  # noqa: ASYNC110 (polls the log)
                await asyncio.sleep(0.5)
            # A fired timer's event says when it was due; the log's own timestamp says when it fired.
            js = store.nc.jetstream()
            fired_at = {}
            for task_id, history in histories.items():
                if expiry := next((r for r in history if isinstance(r.event, TaskLeaseExpired)), None):
                    stored = await js.get_msg(store.stream, expiry.seq, direct=True)
                    fired_at[task_id] = datetime.fromisoformat(stored.headers["Nats-Time-Stamp"]).timestamp()
            registrations = [
                r
                for r in await store.read_subject(f"cp.acme.worker.{heir_id}")
                if isinstance(r.event, WorkerRegistered)
            ]
            heir_registration = registrations[-1]  # the killed runner registered first under the same id
        finally:
            await store.close()
    finally:
        heir.send_signal(signal.SIGTERM)
        heir.wait(30)

    def seconds_after_kill(moment: datetime) -> float:
        return moment.timestamp() - killed_at

    expired, expiry_delivered, resumed, waited, progressed, after_registration = [], [], [], [], [], []
    released_after: list[float] = []
    lost = duplicated_ops = completed_twice = 0
    for task_id in ids:
        events = [r.event for r in histories[task_id]]
        claims = [
            r.event for r in histories[task_id] if isinstance(r.event, TaskClaimed) and r.seq > heir_registration.seq
        ]
        released_after += [
            (e.at - heir_registration.event.at).total_seconds() for e in events if isinstance(e, TaskLeaseReleased)
        ]
        work = [e for e in events if isinstance(e, WorkflowOperationRecorded) and e.name == "work"]
        completions = sum(isinstance(e, TaskCompleted) for e in events)
        lost += completions == 0
        completed_twice += completions > 1
        positions = Counter(e.index for e in events if isinstance(e, WorkflowOperationRecorded))
        duplicated_ops += sum(count - 1 for count in positions.values())
        expiry = next((e for e in events if isinstance(e, TaskLeaseExpired)), None)
        if expiry is not None:
            expired.append(seconds_after_kill(expiry.at))
            expiry_delivered.append(fired_at[task_id] - expiry.at.timestamp())
        if claims:
            resumed.append(seconds_after_kill(claims[0].at))
            after_registration.append((claims[0].at - heir_registration.event.at).total_seconds())
            if expiry is not None:
                waited.append((claims[0].at - expiry.at).total_seconds())
        if work:
            progressed.append(seconds_after_kill(work[0].at))
    started: dict[str, list[float]] = {}
    for line in lines():
        _, name, key, at = line.split()
        started.setdefault(f"{name} {key}", []).append(float(at))
    rerun_recorded_steps = 0
    for task_id in ids:
        for recorded in histories[task_id]:
            if isinstance(op := recorded.event, WorkflowOperationRecorded):
                runs = started[f"{op.name} {task_id}:{op.index}"]
                rerun_recorded_steps += sum(at > op.at.timestamp() for at in runs)
    return {
        "tasks in flight at the kill": tasks,
        "lease seconds": lease,
        "lease expired p50 s": pct(expired, 0.5),
        "lease expired max s": max(expired, default=float("nan")),
        "expiry timer delivered late by, p50 s": pct(expiry_delivered, 0.5),
        "expiry timer delivered late by, max s": max(expiry_delivered, default=float("nan")),
        "new runner registered s": seconds_after_kill(heir_registration.event.at),
        "leases released at its registration": len(released_after),
        "registration to lease released, max s": max(released_after, default=float("nan")),
        "registration to resumed p50 s": pct(after_registration, 0.5),
        "registration to resumed max s": max(after_registration, default=float("nan")),
        "resumed within 0.5 s of the registration": sum(r <= RESTART_TARGET_SECONDS for r in after_registration),
        "expiry to new claim p50 s": pct(waited, 0.5),
        "expiry to new claim max s": max(waited, default=float("nan")),
        "resumed p50 s": pct(resumed, 0.5),
        "resumed max s": max(resumed, default=float("nan")),
        "progressed p50 s": pct(progressed, 0.5),
        "progressed max s": max(progressed, default=float("nan")),
        "resumed within lease + 1 s": sum(r <= lease + 1 for r in resumed),
        "lost": lost,
        "duplicated: recorded steps run again": rerun_recorded_steps,
        "duplicated: journal positions recorded twice": duplicated_ops,
        "duplicated: tasks completed twice": completed_twice,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--lease-seconds", type=float, default=5.0)
    parser.add_argument("--dev-json", type=Path, help="use a running stack described by this dev.json")
    parser.add_argument(
        "--restart", action="store_true", help="start the killed runner again under its worker id, not another one"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process = None
        dev_json = args.dev_json
        if dev_json is None:
            process = start_stack(Path(tmp), free_port(), 1, dict(os.environ))  # one nats-server
            dev_json = Path(tmp) / "dev.json"
        info = json.loads(dev_json.read_text())
        try:
            result = uvloop.run(run(info, args.tasks, args.lease_seconds, Path(tmp), restart=args.restart))
        finally:
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(60)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| metric | value |")
    print("|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:,.2f} |")
    if any(value for key, value in result.items() if key == "lost" or key.startswith("duplicated")):
        sys.exit(1)


if __name__ == "__main__":
    main()
