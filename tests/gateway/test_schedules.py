"""Schedules over HTTP, through the real stack (NATS message schedules fire, the gateway's scheduler
runs the fires): validation, roles, orgs, idempotency, triggers, the overlap policies, fires on time,
a fire neither lost nor doubled across a restart of every process (nats-server included), a fire that
another gateway's pause got to first, a run recorded before a crash, and the upgrade of fires armed by
an older release.

Schedules that fire are deleted at the end of their test: other tests share the stream."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from application.idempotency import derived_id
from controlplane.embedded import EmbeddedNats
from core.domain.commands import PauseSchedule, RecordScheduleRun
from core.domain.events import ScheduleFired, ScheduleRunRecorded, TaskSubmitted
from core.domain.ids import new_id
from core.domain.schedules import SCHEDULE, SCHEDULE_FIRES, run_task_id
from core.domain.subjects import aggregate_subject
from core.log.event_store import TIMER_ACTOR, AppendMeta
from core.log.handler import CommandHandler, timer_subject
from gateway.scheduler import LEGACY_CONSUMER
from gateway.schedules import SCHEDULER_ACTOR
from tests.gateway.conftest import Stack, new_org, own_database, serve_stack
from tests.gateway.test_api import appended_since, last_seq, problem, queue
from tests.gateway.test_console_http import csrf, sign_in

pytestmark = pytest.mark.integration

NEVER_SOON = "0 0 1 1 *"
"""New Year's midnight: a schedule that fires in no test."""


def client(stack: Stack, key: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}", **headers}, timeout=20)


async def create(c: httpx.AsyncClient, q: str, **fields: Any) -> dict[str, Any]:
    body = {"cron": NEVER_SOON, "task": {"type": "report", "queue": q, "payload": {"n": 1}}, **fields}
    r = await c.post("/v1/schedules", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


async def test_create_get_list_pause_resume_and_delete(stack: Stack) -> None:
    _, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["submitter"]) as submitter, client(stack, keys["admin"]) as admin:
        made = await create(submitter, q, id="nightly", cron="30 4 * * *", timezone="Europe/Paris")
        assert {k: made[k] for k in ("id", "cron", "timezone", "overlap", "paused", "last_task_id")} == {
            "id": "nightly",
            "cron": "30 4 * * *",
            "timezone": "Europe/Paris",
            "overlap": "skip",
            "paused": False,
            "last_task_id": None,
        }
        assert made["task"]["type"] == "report" and made["task"]["queue"] == q and made["task"]["priority"] == "normal"
        due = parse(made["next_fire_at"])
        local = due.astimezone(ZoneInfo("Europe/Paris"))
        assert (local.hour, local.minute, local.second) == (4, 30, 0)
        assert datetime.now(UTC) - timedelta(seconds=5) < due < datetime.now(UTC) + timedelta(days=1)
        assert (await admin.get("/v1/schedules/nightly")).json() == made
        other = await create(admin, q, overlap="allow", paused=True)
        assert other["paused"] is True and other["next_fire_at"] is None and len(other["id"]) > 8
        # Another credential's write: read after its seq (a caller's own writes need no min_seq).
        listed = (await submitter.get("/v1/schedules", params={"min_seq": other["seq"]})).json()["items"]
        assert [item["id"] for item in listed] == ["nightly", other["id"]]
        paused = (await submitter.post("/v1/schedules/nightly/pause")).json()
        assert (paused["paused"], paused["next_fire_at"]) == (True, None)
        resumed = (await submitter.post("/v1/schedules/nightly/resume")).json()
        assert resumed["paused"] is False and parse(resumed["next_fire_at"]) == due
        assert (await submitter.delete("/v1/schedules/nightly")).status_code == 204
        problem(await submitter.get("/v1/schedules/nightly"), 404)
        problem(await submitter.post("/v1/schedules/nightly/trigger"), 404)
        # The deleter's own list shows the delete (a 204 has no seq another reader could wait for).
        assert [item["id"] for item in (await submitter.get("/v1/schedules")).json()["items"]] == [other["id"]]
        again = await create(admin, q, id="nightly")  # a deleted id may be used again
        assert again["last_task_id"] is None


async def test_only_admins_and_submitters_reach_schedules_and_other_orgs_see_none(stack: Stack) -> None:
    org, keys = await new_org(stack)
    _, others = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        made = await create(admin, q)
    sid = made["id"]
    calls = [
        ("POST", "/v1/schedules", {"cron": NEVER_SOON, "task": {"type": "t"}}),
        ("GET", "/v1/schedules", None),
        ("GET", f"/v1/schedules/{sid}", None),
        ("POST", f"/v1/schedules/{sid}/pause", None),
        ("POST", f"/v1/schedules/{sid}/resume", None),
        ("POST", f"/v1/schedules/{sid}/trigger", None),
        ("DELETE", f"/v1/schedules/{sid}", None),
    ]
    seq = await last_seq(stack)
    for role in ("viewer", "worker", "approver"):
        async with client(stack, keys[role]) as c:
            for method, path, body in calls:
                refused = problem(await c.request(method, path, json=body), 403)
                assert "may not schedule" in refused["detail"]
    async with client(stack, others["admin"]) as outsider:
        for method, path, _ in calls[2:]:
            problem(await outsider.request(method, path), 404)
        assert (await outsider.get("/v1/schedules")).json()["items"] == []
    assert await appended_since(stack, seq, org) == [], "nothing refused was appended"


async def test_bad_input_is_a_clear_422_and_appends_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin:
        seq = await last_seq(stack)
        task = {"type": "report"}
        for body, says in [
            ({"cron": "* * * *", "task": task}, "has 4 fields"),
            ({"cron": "61 * * * *", "task": task}, "not a valid expression"),
            ({"cron": "0 0 30 2 *", "task": task}, "not a valid expression"),
            ({"cron": "* * * * *", "timezone": "Mars/Olympus", "task": task}, "not a known IANA time zone"),
            ({"cron": "* * * * *", "timezone": "", "task": task}, "timezone"),
            ({"cron": "* * * * *", "task": task, "overlap": "queue"}, "overlap"),
            ({"cron": "* * * * *"}, "task"),
            ({"cron": "* * * * *", "task": {"payload": 1}}, "type"),
            ({"cron": "* * * * *", "task": {"type": "r", "queue": "Bad Queue"}}, "queue"),
            ({"cron": "* * * * *", "task": {"type": "r", "environment": "nowhere"}}, "environment nowhere"),
            ({"cron": "* * * * *", "task": {"type": "r", "metadata": {f"k{n}": n for n in range(63)}}}, "metadata"),
            ({"cron": "* * * * *", "task": task, "id": "Bad Id"}, "id"),
            ({"cron": "x" * 200, "task": task}, "cron"),
        ]:
            refused = problem(await admin.post("/v1/schedules", json=body), 422)
            assert says in refused["detail"], (body, refused)
        problem(await admin.post("/v1/schedules", content=b"{not json"), 400)
        problem(await admin.get("/v1/schedules/Bad%0AId"), 404)
        problem(await admin.post("/v1/schedules/none-such/pause"), 404)
        problem(await admin.delete("/v1/schedules/none-such"), 404)
        assert await appended_since(stack, seq, org) == [], "nothing refused was appended"


async def test_a_retried_create_returns_the_first_answer_and_appends_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    body = {"cron": NEVER_SOON, "task": {"type": "report", "queue": q}}
    async with client(stack, keys["submitter"]) as submitter:
        first = await submitter.post("/v1/schedules", json=body, headers={"Idempotency-Key": "s-1"})
        assert first.status_code == 201, first.text
        seq = await last_seq(stack)
        again = await submitter.post("/v1/schedules", json=body, headers={"Idempotency-Key": "s-1"})
        assert (again.status_code, again.json()) == (201, first.json())
        assert await appended_since(stack, seq, org) == [], "a retry appends nothing"
        changed = {**body, "overlap": "allow"}
        problem(await submitter.post("/v1/schedules", json=changed, headers={"Idempotency-Key": "s-1"}), 409)
        named = {**body, "id": first.json()["id"]}
        assert "already exists" in problem(await submitter.post("/v1/schedules", json=named), 409)["detail"]
        trigger = f"/v1/schedules/{first.json()['id']}/trigger"
        ran = await submitter.post(trigger, headers={"Idempotency-Key": "t-1"})
        seq = await last_seq(stack)
        rerun = await submitter.post(trigger, headers={"Idempotency-Key": "t-1"})
        assert rerun.json()["last_task_id"] == ran.json()["last_task_id"]
        assert await appended_since(stack, seq, org) == [], "a retried trigger runs nothing again"


async def test_a_trigger_submits_the_task_through_the_submit_path_with_its_schedule_id(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["submitter"]) as submitter:
        made = await create(
            submitter, q, task={"type": "report", "queue": q, "payload": {"n": 7}, "metadata": {"team": "a"}}
        )
        ran = (await submitter.post(f"/v1/schedules/{made['id']}/trigger")).json()
        assert (ran["last_outcome"], ran["runs"]) == ("submitted", 1)
        task = (await submitter.get(f"/v1/tasks/{ran['last_task_id']}")).json()
        assert task["metadata"]["schedule_id"] == made["id"] and task["metadata"]["team"] == "a"
        assert parse(task["metadata"]["schedule_fire_at"]) == parse(ran["last_fire_at"])
        assert (task["queue"], task["payload"], task["status"]) == (q, {"n": 7}, "pending")
        submitted = await submission(stack, org, task["id"])
        assert submitted.submitted_by == f"schedule:{made['id']}"
        assert ran["next_fire_at"] == made["next_fire_at"], "a trigger leaves the cron fires alone"


async def test_the_submit_policy_decides_a_scheduled_task_as_any_other(stack: Stack) -> None:
    """The shipped policy makes tasks of an environment named prod wait for an approval."""
    _org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        r = await admin.post("/v1/environments", json={"name": "prod", "queues": [q]})
        assert r.status_code == 201, r.text
        made = await create(admin, q, task={"type": "deploy", "environment": "prod"})
        ran = (await admin.post(f"/v1/schedules/{made['id']}/trigger")).json()
        task = (await admin.get(f"/v1/tasks/{ran['last_task_id']}")).json()
        assert (task["environment"], task["queue"]) == ("prod", q)
        assert task["status"] == "awaiting_approval", task


async def test_overlap_policies_as_seen_through_the_api(stack: Stack) -> None:
    _, keys = await new_org(stack)
    async with client(stack, keys["submitter"]) as submitter:
        skip = await create(submitter, queue(), overlap="skip")
        first = (await submitter.post(f"/v1/schedules/{skip['id']}/trigger")).json()
        second = (await submitter.post(f"/v1/schedules/{skip['id']}/trigger")).json()
        assert (second["last_outcome"], second["last_task_id"], second["runs"], second["skipped"]) == (
            "skipped",
            first["last_task_id"],
            1,
            1,
        )
        assert f"previous run {first['last_task_id']} is still pending" in second["last_reason"]
        cancelled = await submitter.post(f"/v1/tasks/{first['last_task_id']}/cancel", json={})
        assert cancelled.status_code == 200, cancelled.text
        third = (await submitter.post(f"/v1/schedules/{skip['id']}/trigger")).json()
        assert third["last_outcome"] == "submitted" and third["last_task_id"] != first["last_task_id"]

        allow = await create(submitter, queue(), overlap="allow")
        runs = [(await submitter.post(f"/v1/schedules/{allow['id']}/trigger")).json() for _ in range(2)]
        tasks = [(await submitter.get(f"/v1/tasks/{run['last_task_id']}")).json() for run in runs]
        assert [task["status"] for task in tasks] == ["pending", "pending"]
        assert runs[0]["last_task_id"] != runs[1]["last_task_id"] and runs[1]["runs"] == 2

        cancel = await create(submitter, queue(), overlap="cancel_previous")
        before = (await submitter.post(f"/v1/schedules/{cancel['id']}/trigger")).json()
        after = (await submitter.post(f"/v1/schedules/{cancel['id']}/trigger")).json()
        assert after["last_outcome"] == "cancelled_previous"
        old = (await submitter.get(f"/v1/tasks/{before['last_task_id']}")).json()
        new = (await submitter.get(f"/v1/tasks/{after['last_task_id']}")).json()
        assert (old["status"], new["status"]) == ("cancelled", "pending")
        assert f"schedule {cancel['id']}" in old["cancellation_reason"]


async def runs_of(stack: Stack, org: str, schedule_id: str) -> list[ScheduleRunRecorded]:
    history = await stack.services.store.read_subject(aggregate_subject(org, "schedule", schedule_id))
    return [item.event for item in history if isinstance(item.event, ScheduleRunRecorded)]


async def submission(stack: Stack, org: str, task_id: str) -> TaskSubmitted:
    [first, *_] = await stack.services.store.read_subject(aggregate_subject(org, "task", task_id))
    assert isinstance(first.event, TaskSubmitted)
    return first.event


async def submitted_at(stack: Stack, org: str, task_id: str) -> datetime:
    return (await submission(stack, org, task_id)).at


async def test_a_schedule_fires_on_time_each_second_and_pause_stops_it(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["submitter"]) as submitter:
        made = await create(submitter, queue(), cron="* * * * * *", overlap="allow")
        deadline = time.monotonic() + 15
        while len(await runs_of(stack, org, made["id"])) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await submitter.post(f"/v1/schedules/{made['id']}/pause")
        await asyncio.sleep(0.5)  # a run recorded just before the pause is still carried out
        runs = await runs_of(stack, org, made["id"])
        assert len(runs) >= 3
        fires = [run.fire_at for run in runs]
        assert fires == sorted(set(fires)), "each cron second ran once, in order"
        assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(fires))
        for run in runs:
            assert run.outcome == "submitted" and run.task_id is not None
            late = (await submitted_at(stack, org, run.task_id) - run.fire_at).total_seconds()
            assert 0 <= late < 1.0, f"fired {late:.3f} s late"
        await asyncio.sleep(2.5)
        assert len(await runs_of(stack, org, made["id"])) == len(runs), "a paused schedule does not fire"
        await submitter.delete(f"/v1/schedules/{made['id']}")


async def test_fires_are_neither_lost_nor_doubled_across_a_restart_of_every_process(
    tmp_path: Path, database_url: str
) -> None:
    """Gateway (with its scheduler), projector and nats-server all stop; cron times pass while they are
    down; when they are back the one stored fire is the catch-up run (no burst), and the cron goes on,
    on time, each fire once."""
    every = 3
    with EmbeddedNats(tmp_path / "nats") as nats_server:
        async with own_database(database_url, "sched") as database:
            async with serve_stack(nats_server.url, database) as first:
                async with client(first, first.keys["acme"]["submitter"]) as submitter:
                    made = await create(submitter, queue(), cron=f"*/{every} * * * * *", overlap="allow")
                sid = made["id"]
                deadline = time.monotonic() + 15
                while len(await runs_of(first, "acme", sid)) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert len(await runs_of(first, "acme", sid)) >= 2
            nats_server.kill()  # every process of the stack is down now
            killed = datetime.now(UTC)
            await asyncio.sleep(3 * every)
            nats_server.start()
            async with serve_stack(nats_server.url, database) as second:
                ready = datetime.now(UTC)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    runs = await runs_of(second, "acme", sid)
                    if sum(run.fire_at > ready for run in runs) >= 3:
                        break
                    await asyncio.sleep(0.1)
                async with client(second, second.keys["acme"]["submitter"]) as submitter:
                    await submitter.delete(f"/v1/schedules/{sid}")
                    tasks = [(await submitter.get(f"/v1/tasks/{run.task_id}")).json() for run in runs]
                submitted = [await submitted_at(second, "acme", task["id"]) for task in tasks]
    fires = [run.fire_at for run in runs]
    assert fires == sorted(set(fires)), "no fire ran twice"
    assert len({task["id"] for task in tasks}) == len(runs) and all(run.outcome == "submitted" for run in runs)
    assert all(task["metadata"]["schedule_id"] == sid for task in tasks)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(fires)]
    long = [gap for gap in gaps if gap != every]
    assert len(long) == 1 and long[0] >= 2 * every, f"one gap for the downtime, the rest every {every} s: {gaps}"
    catch_up = fires[gaps.index(long[0])]
    assert killed - timedelta(seconds=every) <= catch_up <= ready, "the stored fire ran once, when the stack was back"
    assert len([f for f in fires if killed <= f <= ready]) <= 1, "one catch-up run, not a burst"
    late = {f: (at - f).total_seconds() for f, at in zip(fires, submitted, strict=True)}
    on_time = [late[f] for f in fires if f > ready + timedelta(seconds=0.5)]
    assert len(on_time) >= 2 and all(0 <= seconds < 1.0 for seconds in on_time), on_time


async def test_the_console_lists_schedules_and_pauses_and_resumes_them(stack: Stack) -> None:
    _, keys = await new_org(stack)
    async with client(stack, keys["submitter"]) as submitter:
        made = await create(submitter, queue())
        ran = (await submitter.post(f"/v1/schedules/{made['id']}/trigger")).json()
    async with sign_in(stack, keys["submitter"]) as http:
        deadline = time.monotonic() + 10
        while True:  # the page reads the read model, which folds the trigger's run a moment later
            page = await http.get("/console/schedules")
            assert page.status_code == 200, page.text
            if ran["last_task_id"] in page.text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert f'data-testid="schedule-row" data-schedule-id="{made["id"]}" data-paused="false"' in page.text
        assert f'href="/console/tasks/{ran["last_task_id"]}"' in page.text and NEVER_SOON in page.text
        assert 'href="/console/schedules"' in page.text, "a nav link"
        token = await csrf(http)
        refused = await http.post(f"/console/schedules/{made['id']}/pause", data={})
        assert refused.status_code == 403, "no CSRF token, no pause"
        paused = await http.post(
            f"/console/schedules/{made['id']}/pause", data={"csrf": token}, headers={"Accept": "application/json"}
        )
        assert (paused.status_code, paused.json()["paused"]) == (200, True), paused.text
        async with client(stack, keys["viewer"]) as viewer:
            assert (await viewer.get(f"/v1/schedules/{made['id']}")).status_code == 403
        async with client(stack, keys["admin"]) as admin:
            assert (await admin.get(f"/v1/schedules/{made['id']}")).json()["paused"] is True
        resumed = await http.post(
            f"/console/schedules/{made['id']}/resume", data={"csrf": token}, headers={"Accept": "application/json"}
        )
        assert resumed.json()["paused"] is False
    async with sign_in(stack, keys["viewer"]) as http:
        assert (await http.get("/console/schedules")).status_code == 403


async def fire(stack: Stack, org: str, schedule_id: str, at: datetime, generation: int = 1) -> None:
    """Store the fire the schedule's timer stores at ``at`` (now, whatever ``at`` says) and wait until
    the scheduler has handled it (its consumer acknowledged it)."""
    store = stack.services.store
    subject = aggregate_subject(org, SCHEDULE_FIRES, schedule_id)
    meta = AppendMeta(command_id=new_id(), actor=TIMER_ACTOR, time=datetime.now(UTC))
    earlier = await store.read_subject(subject)
    fired = [ScheduleFired(at=at, generation=generation)]
    [seq] = await store.append(subject, fired, expected_last_seq=earlier[-1].seq if earlier else 0, meta=meta)
    js = store.nc.jetstream()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        info = await js.consumer_info(store.stream, "cp_schedule_fires")
        if info.ack_floor.stream_seq >= seq and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the scheduler did not handle the fire at seq {seq}")


async def test_a_fire_that_another_gateways_pause_got_to_first_submits_nothing(stack: Stack) -> None:
    """This gateway last saw the schedule waiting for the fire; another gateway paused it since, and its
    purge of the timer was lost. The fire comes: the log refuses its run, and no task is submitted."""
    org, keys = await new_org(stack)
    async with client(stack, keys["submitter"]) as submitter:
        made = await create(submitter, queue())
    due = parse(made["next_fire_at"])
    other_gateway = CommandHandler(stack.services.store)
    await other_gateway.handle(org, PauseSchedule(schedule_id=made["id"]), actor=SCHEDULER_ACTOR)
    cached = stack.services.handler.cached_state(org, "schedule", made["id"])
    assert cached is not None and not cached.paused, "this gateway's copy is behind the log"
    await fire(stack, org, made["id"], due)
    assert await runs_of(stack, org, made["id"]) == []
    task_id = run_task_id(org, made["id"], 1, due)
    assert await stack.services.store.read_subject(aggregate_subject(org, "task", task_id)) == []


async def test_a_run_recorded_before_a_crash_is_submitted_when_its_fire_comes_again(stack: Stack) -> None:
    """A scheduler recorded the run and died before submitting its task: the fire, delivered again,
    submits the task the record names, once."""
    org, keys = await new_org(stack)
    async with client(stack, keys["submitter"]) as submitter:
        made = await create(submitter, queue(), overlap="allow")
        due = parse(made["next_fire_at"])
        task_id = run_task_id(org, made["id"], 1, due)
        record = RecordScheduleRun(
            schedule_id=made["id"], fire_at=due, generation=1, task_id=task_id, outcome="submitted"
        )
        await stack.services.handler.handle(
            org, record, actor=SCHEDULER_ACTOR, command_id=derived_id(task_id, "schedule-run"), causation_id=task_id
        )
        await fire(stack, org, made["id"], due)
        await fire(stack, org, made["id"], due)  # and once more: nothing more happens
        [run] = await runs_of(stack, org, made["id"])
        assert (run.task_id, run.outcome) == (task_id, "submitted")
        history = await stack.services.store.read_subject(aggregate_subject(org, "task", task_id))
        assert [type(item.event) for item in history] == [TaskSubmitted]
        task = (await submitter.get(f"/v1/tasks/{task_id}")).json()
        assert task["metadata"]["schedule_id"] == made["id"] and parse(task["metadata"]["schedule_fire_at"]) == due
        await submitter.delete(f"/v1/schedules/{made['id']}")


async def test_fires_armed_by_an_older_release_are_moved_beside_their_schedule(stack: Stack) -> None:
    """An older release armed fires into the schedule's own subject and ran them from the consumer
    ``cp_scheduler``. A scheduler that finds that consumer arms each live schedule's next fire on its
    fire subject and deletes the consumer; a second look finds nothing to do."""
    org, keys = await new_org(stack)
    async with client(stack, keys["submitter"]) as submitter:
        made = await create(submitter, queue())
    store, scheduler = stack.services.store, stack.services.scheduler
    assert scheduler is not None
    subject = aggregate_subject(org, "schedule", made["id"])
    state = stack.services.handler.cached_state(org, "schedule", made["id"])
    [wanted] = [timer_subject(subject, timer) for timer in SCHEDULE.timers(state)]
    js = store.nc.jetstream()
    await js.purge_stream(store.stream, subject=wanted)  # the older release never armed it there
    await js.add_consumer(store.stream, durable_name=LEGACY_CONSUMER, filter_subject="cp.*.schedule.*")
    deadline = time.monotonic() + 10
    while (org, made["id"]) not in await stack.services.read_model.live_schedules():
        assert time.monotonic() < deadline, "the read model never showed the schedule"
        await asyncio.sleep(0.05)
    assert await scheduler.upgrade_legacy_fires() >= 1
    assert await store.holds(wanted)
    assert LEGACY_CONSUMER not in [info.name for info in await js.consumers_info(store.stream)]
    assert await scheduler.upgrade_legacy_fires() == 0
