"""Schedules under crashes: 300 schedules fire together every 2 s while the gateway, the one process
running the scheduler here, is killed with SIGKILL in the middle of a burst and restarted, four times.
Afterwards every fire the scheduler acknowledged has its run recorded, no fire ran twice, every run
that submitted names a task that is in the log exactly once, and no task was submitted without a
recorded run (the run is recorded first, so a kill between the two leaves a run whose task the fire,
delivered again, submits)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest

from controlplane.embedded import EmbeddedNats
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.seed import seed_org
from core.domain.commands import SYSTEM, PauseSchedule
from core.domain.events import ScheduleFired, ScheduleRunRecorded, TaskSubmitted
from core.domain.schedules import SUBMITTING_OUTCOMES
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from gateway.scheduler import CONSUMER
from tests.chaos.test_lifecycle_chaos import Processes, retried

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SCHEDULES = 300
EVERY = 2
KILLS = 4


async def test_schedule_fires_survive_killing_the_gateway_mid_burst(
    servers: tuple[EmbeddedNats, EmbeddedPostgres],
    log_and_database: tuple[JetStreamEventStore, asyncpg.Pool],
    tmp_path: Path,
) -> None:
    nats_server, postgres = servers
    store, _ = log_and_database
    handler = CommandHandler(store)
    keys = await seed_org(handler, "acme", ("submitter",))
    processes = Processes(nats_server.url, postgres.dsn, keys["submitter"], tmp_path)
    for name in ("projector", "gateway"):  # the gateway knows API keys from the read model
        processes.start(name)
    ids = [f"tick-{n:03d}" for n in range(SCHEDULES)]
    try:
        async with httpx.AsyncClient(
            base_url=processes.url, headers={"Authorization": f"Bearer {keys['submitter']}"}, timeout=10
        ) as client:
            for schedule_id in ids:
                body = {
                    "id": schedule_id,
                    "cron": f"*/{EVERY} * * * * *",
                    "overlap": "allow",
                    "task": {"type": "tick", "queue": "chaos-schedules"},
                }
                await retried(lambda body=body: client.post("/v1/schedules", json=body), ok=(201,))
        for _ in range(KILLS):  # 150 ms into a burst, while its runs are being recorded and submitted
            now = time.time()
            await asyncio.sleep(EVERY - now % EVERY + 0.15)
            await processes.kill("gateway")
            await asyncio.sleep(0.3)
            processes.start("gateway")
        # Until the scheduler has acknowledged everything delivered (a fire cut short by a kill comes
        # again after the consumer's acknowledgement wait): what it acknowledged is what it ran.
        js = store.nc.jetstream()
        async with asyncio.timeout(60):
            while True:
                info = await js.consumer_info(store.stream, CONSUMER)
                if info.num_pending == 0 and info.num_ack_pending == 0 and info.ack_floor.stream_seq:
                    acknowledged_through = info.ack_floor.stream_seq
                    break
                await asyncio.sleep(0.05)
        for schedule_id in ids:
            await handler.handle("acme", PauseSchedule(schedule_id=schedule_id), actor=SYSTEM)
        await asyncio.sleep(1)  # the fires in flight at the pause: refused or carried out
    finally:
        await processes.stop_all()

    checked_fires = 0
    submitted_runs: list[ScheduleRunRecorded] = []
    for schedule_id in ids:
        fires = await store.read_subject(f"cp.acme.schedulefire.{schedule_id}")
        runs = [
            item.event
            for item in await store.read_subject(f"cp.acme.schedule.{schedule_id}")
            if isinstance(item.event, ScheduleRunRecorded)
        ]
        ran = Counter(run.fire_at for run in runs)
        assert all(count == 1 for count in ran.values()), f"{schedule_id}: a fire ran twice: {ran}"
        for fire in fires:
            assert isinstance(fire.event, ScheduleFired)
            if fire.seq <= acknowledged_through:
                assert fire.event.at in ran, f"{schedule_id}: the fire at {fire.event.at} was acknowledged, never run"
                checked_fires += 1
        submitted_runs += [run for run in runs if run.outcome in SUBMITTING_OUTCOMES]
    assert checked_fires >= SCHEDULES * KILLS, "every kill fell on a burst that was run after it"
    finished_late = 0  # runs whose task came with the fire's redelivery: a kill fell between the two
    for run in submitted_runs:
        history = await store.read_subject(f"cp.acme.task.{run.task_id}")
        assert [type(item.event) for item in history][:1] == [TaskSubmitted], f"the run's task {run.task_id}"
        assert sum(isinstance(item.event, TaskSubmitted) for item in history) == 1
        finished_late += (history[0].event.at - run.at).total_seconds() > 5
    tasks = (await store.nc.jetstream().stream_info(store.stream, subjects_filter="cp.acme.task.*")).state.subjects
    assert len(tasks or {}) == len(submitted_runs), "no task was submitted without a recorded run"
    print(
        f"\n{SCHEDULES} schedules every {EVERY} s, the gateway killed {KILLS} times mid-burst: "
        f"{len(submitted_runs)} runs ({finished_late} submitted when their fire came again), "
        f"{checked_fires} acknowledged fires checked"
    )
