"""Replay benchmark: how fast the log folds back into state (issue 6; target ≥ 50,000 events/s folded).

Two histories, written through the command handler into a nats-server this benchmark starts (or
NATS_URL):

* one task of ``--events`` events (claims, journal operations, heartbeats, approvals asked and
  decided), read as ``controlplane state --at`` reads it;
* an org of ``--org-tasks`` tasks (submit, claim, ten operations with heartbeats, complete), read as
  ``controlplane export`` and ``controlplane verify`` read it.

For each it reports events/s, the median of ``--rounds`` rounds: the fold alone (events already
decoded in memory) and end to end (read from JetStream by batched direct get, decode, fold or write
the hash-chained export).

    .venv/bin/python bench/replay.py [--events 10000] [--org-tasks 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from controlplane.embedded import EmbeddedNats
from controlplane.export import export_org
from controlplane.task_log import connect, fold_org_tasks, task_history
from core.domain.audit import verify_export
from core.domain.commands import (
    Actor,
    ClaimTask,
    CompleteTask,
    DecideApproval,
    HeartbeatTask,
    RecordOperation,
    RequestApproval,
    SubmitTask,
)
from core.domain.events import decode_event
from core.domain.history import state_at
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.task_decider import TASK
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore

WORKER = Actor("bench-worker", frozenset({"worker"}))
APPROVER = Actor("bench-approver", frozenset({"approver"}))
SUBMITTER = Actor("bench-submitter", frozenset({"submitter"}))
OPERATIONS_PER_CLAIM = 40
ORG_OPERATIONS = 10


async def long_task(handler: CommandHandler, org: str, events: int) -> str:
    """One task of about ``events`` events, as a long agent run makes them: each cycle is a claim,
    OPERATIONS_PER_CLAIM journal operations each followed by a heartbeat, and an approval asked and
    decided (84 events; 10,000 events hold ~4,800 operations and ~120 approvals)."""
    task_id = new_id()
    await handler.handle(org, SubmitTask(task_id=task_id, task_type="long", payload={"n": events}), actor=SUBMITTER)
    written, cycle = 1, 0
    while written < events:
        lease = {"worker_id": "bench-worker", "lease_id": f"l{cycle}"}
        await handler.handle(org, ClaimTask(task_id=task_id, **lease, lease_seconds=3600), actor=WORKER)
        state, _ = await handler.load(org, "task", task_id)
        for step in range(OPERATIONS_PER_CLAIM):
            index = len(state.journal) + step
            result = {"step": index, "output": f"line {index} of the agent's work"}
            await handler.handle(
                org,
                RecordOperation(task_id=task_id, **lease, index=index, kind="step", name=f"s{step}", result=result),
                actor=WORKER,
            )
            await handler.handle(org, HeartbeatTask(task_id=task_id, **lease, progress=index), actor=WORKER)
        approval = f"{task_id}-{cycle + 1}"
        await handler.handle(
            org,
            RequestApproval(
                task_id=task_id,
                **lease,
                approval_id=approval,
                reason="continue?",
                journal_index=len(state.journal) + OPERATIONS_PER_CLAIM,
            ),
            actor=WORKER,
        )
        await handler.handle(
            org, DecideApproval(task_id=task_id, approval_id=approval, decision="approve"), actor=APPROVER
        )
        written += 2 + 2 * OPERATIONS_PER_CLAIM + 2
        cycle += 1
    return task_id


async def org_tasks(handler: CommandHandler, org: str, tasks: int, lanes: int = 64) -> None:
    """``tasks`` tasks of 23 events each, written by ``lanes`` concurrent workers."""
    queue = iter(range(tasks))

    async def lane() -> None:
        for number in queue:
            task_id = new_id()
            lease = {"worker_id": "bench-worker", "lease_id": f"l{number}"}
            await handler.handle(
                org, SubmitTask(task_id=task_id, task_type="org", payload={"n": number}), actor=SUBMITTER
            )
            await handler.handle(org, ClaimTask(task_id=task_id, **lease, lease_seconds=3600), actor=WORKER)
            for index in range(ORG_OPERATIONS):
                await handler.handle(
                    org,
                    RecordOperation(
                        task_id=task_id, **lease, index=index, kind="llm", name="think", result={"i": index}
                    ),
                    actor=WORKER,
                )
                await handler.handle(org, HeartbeatTask(task_id=task_id, **lease, progress=index), actor=WORKER)
            await handler.handle(org, CompleteTask(task_id=task_id, **lease, result={"done": number}), actor=WORKER)

    await asyncio.gather(*(lane() for _ in range(lanes)))


async def rate(rounds: int, events: Callable[[], Awaitable[int]]) -> Measured:
    """Median events/s over ``rounds`` runs of ``events`` (which returns how many it handled), by wall
    clock and by this process's CPU time (steadier on a machine that other work shares)."""
    wall, cpu, handled = [], [], 0
    for _ in range(rounds):
        started, started_cpu = time.perf_counter(), time.process_time()
        handled = await events()
        wall.append(handled / (time.perf_counter() - started))
        cpu.append(handled / max(time.process_time() - started_cpu, 1e-9))
    return statistics.median(wall), statistics.median(cpu), handled


def fold_all(histories: list[list[Any]]) -> int:
    for events in histories:
        TASK.fold(events)
    return sum(len(events) for events in histories)


Measured = tuple[float, float, int]
"""events/s by wall clock, events/s by CPU time, events handled."""


async def run(url: str, events: int, tasks: int, rounds: int) -> list[tuple[str, Measured]]:
    writer = await JetStreamEventStore.connect(url)
    handler = CommandHandler(writer)
    org = f"bench-{new_id()[-8:]}"
    started = time.perf_counter()
    long_id = await long_task(handler, org, events)
    await org_tasks(handler, org, tasks)
    print(f"wrote the histories in {time.perf_counter() - started:.1f} s")

    ours = await connect(url)
    results: list[tuple[str, Measured]] = []

    async def one_task() -> int:
        history = await task_history(ours, org, long_id)
        state_at(history)
        return len(history)

    history: list[RecordedEvent] = await task_history(ours, org, long_id)

    async def fold_one() -> int:
        state_at(history)
        return len(history)

    results.append(("one task: fold only", await rate(rounds, fold_one)))
    results.append(("one task: read + decode + fold (state --at)", await rate(rounds, one_task)))

    async def read_org() -> int:
        folded = await fold_org_tasks(ours.reader, org)
        return sum(task.events for task in folded.values())

    exported = io.BytesIO()

    async def export() -> int:
        nonlocal exported
        exported = io.BytesIO()
        return (await export_org(ours.reader, org, exported)).events

    task_events: dict[str, list[Any]] = {}
    async for batch in ours.reader.batches(f"cp.{org}.task.>"):
        for msg in batch:
            task_events.setdefault(msg.headers["Nats-Subject"], []).append(decode_event(msg.data))  # type: ignore[index]
    histories = list(task_events.values())

    async def fold_org_only() -> int:
        return fold_all(histories)

    results.append(("org: fold only", await rate(rounds, fold_org_only)))
    results.append(("org: read + decode + fold every task (verify's read)", await rate(rounds, read_org)))
    results.append(("org: export (read + hash chain + write)", await rate(rounds, export)))
    lines = exported.getvalue().splitlines(keepends=True)

    async def audit_verify() -> int:
        report = verify_export(lines)
        assert report.ok, report.problem
        return report.events

    results.append(("org: audit verify of the export", await rate(rounds, audit_verify)))
    await ours.close()
    await writer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000, help="events of the one long task")
    parser.add_argument("--org-tasks", type=int, default=2_000, help="tasks of the org (23 events each)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    if url := os.environ.get("NATS_URL"):
        results = uvloop.run(run(url, args.events, args.org_tasks, args.rounds))
    else:
        with EmbeddedNats(Path(tempfile.mkdtemp(prefix="bench-replay-"))) as server:
            results = uvloop.run(run(server.url, args.events, args.org_tasks, args.rounds))
    width = max(len(name) for name, _ in results)
    print(f"{'measurement (median of rounds)':<{width}}  {'events':>8}  {'events/s':>10}  {'per CPU s':>10}")
    for name, (per_second, per_cpu_second, handled) in results:
        print(f"{name:<{width}}  {handled:>8,}  {per_second:>10,.0f}  {per_cpu_second:>10,.0f}")


if __name__ == "__main__":
    main()
