"""Tasks through ``controlplane.client``, with Client and AsyncClient alike: submit, read, list every
page, cancel, resume; wait for the end over the event feed (resumed after a dropped connection) or by
long-polling when the feed is refused; follow a task's or the org's events across a dropped connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from controlplane.client import Conflict, Task
from tests.client.conftest import Connect, Cut, Faults, RestartableGateway
from tests.gateway.conftest import Stack
from tests.gateway.test_api import claim, queue, submit

pytestmark = pytest.mark.integration


async def until(condition: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


async def finish(stack: Stack, q: str, result: Any, org: str = "acme") -> None:
    """Claim the task on ``q`` as a worker over plain HTTP and complete it with ``result``."""
    async with stack.client(org, role="worker") as worker:
        claimed = await claim(worker, q)
        assert claimed is not None
        done = await worker.post(
            f"/v1/tasks/{claimed['task']['id']}/complete",
            json={"worker_id": "w1", "lease_id": claimed["lease"]["id"], "result": result},
        )
        assert done.status_code == 200, done.text


async def test_submit_get_list_every_page_and_cancel(connect: Connect) -> None:
    faults = Faults()
    client = connect("submitter", transport=faults)
    q = queue()
    submitted = [
        await client.submit("deploy", {"n": n}, queue=q, priority="high", metadata={"team": "sre"}) for n in range(7)
    ]
    assert all(isinstance(task, Task) and task.status == "pending" for task in submitted)
    assert [task.payload for task in submitted] == [{"n": n} for n in range(7)]
    first = await client.get(submitted[0].id)
    assert (first.id, first.queue, first.type, first.priority, first.metadata) == (
        submitted[0].id,
        q,
        "deploy",
        "high",
        {"team": "sre"},
    )

    listed = await client.list(queue=q, limit=3)
    assert sorted(task.id for task in listed) == sorted(task.id for task in submitted)
    pages = faults.sent("GET", "/v1/tasks")
    assert len(pages) == 3
    assert [page.url.params.get("cursor") is None for page in pages] == [True, False, False]

    cancelled = await client.cancel(submitted[0].id, reason="not needed")
    assert cancelled.status == "cancelled" and cancelled.is_terminal
    assert len(await client.list(queue=q, status="pending")) == 6
    with pytest.raises(Conflict):
        await client.cancel(submitted[0].id)


async def test_resume_takes_a_parked_task_back(connect: Connect, stack: Stack) -> None:
    client = connect("admin")
    q = queue()
    async with stack.client(role="submitter") as submitter:
        task = await submit(submitter, q)
    async with stack.client(role="worker") as worker:
        claimed = await claim(worker, q)
        assert claimed is not None
        parked = await worker.post(
            f"/v1/tasks/{task['id']}/non-determinism",
            json={"worker_id": "w1", "lease_id": claimed["lease"]["id"], "index": 0, "expected": "a", "actual": "b"},
        )
        assert parked.status_code == 200, parked.text
    assert (await client.get(task["id"])).parked is not None
    resumed = await client.resume(task["id"])
    assert resumed.parked is None and resumed.status == "pending"
    with pytest.raises(Conflict):
        await client.resume(task["id"])


async def test_wait_for_result_follows_the_task_feed_and_resumes_it_after_a_drop(
    connect: Connect, stack: Stack
) -> None:
    """The first connection breaks after one event (the claim): the client reopens the feed after that
    event and sees the completion there."""
    feeds = 0

    def cut_first_feed(request: httpx.Request) -> Cut | None:
        nonlocal feeds
        if request.url.path.endswith("/events"):
            feeds += 1
            return Cut(events=1) if feeds == 1 else None
        return None

    faults = Faults(cut_first_feed)
    client = connect("viewer", transport=faults)
    q = queue()
    async with stack.client(role="submitter") as submitter:
        task = await submit(submitter, q)
    waiting = asyncio.create_task(client.wait_for_result(task["id"], timeout=20))
    await until(lambda: feeds == 1)
    await finish(stack, q, {"ok": True})
    done = await waiting

    assert (done.status, done.result) == ("completed", {"ok": True})
    first, second = faults.sent("GET", "/events")
    assert first.headers["last-event-id"] == str(task["seq"]), "the feed starts after the state first read"
    assert int(second.headers["last-event-id"]) > task["seq"], "reopened after the event seen"
    assert not [r for r in faults.requests if "wait_seconds" in r.url.params]


@pytest.mark.parametrize("ended", ["while it is down", "once it is back"])
async def test_wait_for_result_outlasts_a_gateway_restart(
    connect: Connect, stack: Stack, restartable_gateway: RestartableGateway, ended: str
) -> None:
    """The gateway's HTTP server stops under the open feed and starts again on the same port, NATS and
    PostgreSQL staying up; the task ends while it is down, or once it is back and followed again."""
    gateway, recorder, q = restartable_gateway, Faults(), queue()
    client = connect("viewer", org="globex", url=gateway.url, transport=recorder)
    async with stack.client("globex", role="submitter") as submitter:
        task = await submit(submitter, q)

    def open_streams() -> int:
        return stack.services.streams.open_for("globex", "")[1]

    before = open_streams()
    waiting = asyncio.create_task(client.wait_for_result(task["id"], timeout=30))
    await until(lambda: open_streams() == before + 1)
    await gateway.stop()
    await until(lambda: open_streams() == before)  # the feed was cut
    if ended == "while it is down":
        await finish(stack, q, {"ok": True}, org="globex")
        await gateway.start()
    else:
        await gateway.start()
        await until(lambda: open_streams() == before + 1)
        await finish(stack, q, {"ok": True}, org="globex")
    done = await asyncio.wait_for(waiting, 20)

    assert (done.id, done.status, done.result) == (task["id"], "completed", {"ok": True})
    first, *reopened = recorder.sent("GET", "/events")
    assert reopened, "the feed was reopened"
    assert {r.headers["last-event-id"] for r in [first, *reopened]} == {str(task["seq"])}, "after the event seen"
    assert not [r for r in recorder.requests if "wait_seconds" in r.url.params], "no long-poll needed"


async def test_wait_for_result_long_polls_when_the_feed_is_refused(connect: Connect, stack: Stack) -> None:
    def refuse_feeds(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith("/events"):  # what the gateway answers a credential with too many streams
            problem = {"type": "about:blank", "title": "Too many requests", "status": 429, "detail": "stream slots"}
            return httpx.Response(429, json=problem, headers={"Retry-After": "5"})
        return None

    faults = Faults(refuse_feeds)
    client = connect("viewer", transport=faults)
    q = queue()
    async with stack.client(role="submitter") as submitter:
        task = await submit(submitter, q)
    waiting = asyncio.create_task(client.wait_for_result(task["id"], timeout=20))
    await until(lambda: any("wait_seconds" in r.url.params for r in faults.requests))
    started = time.monotonic()
    await finish(stack, q, [1, 2, 3])
    done = await waiting

    assert (done.status, done.result) == ("completed", [1, 2, 3])
    assert time.monotonic() - started < 5, "the long-poll answers when the task ends, not at its deadline"
    assert len(faults.sent("GET", "/events")) == 1


async def test_wait_for_result_raises_timeout_at_the_deadline(connect: Connect, stack: Stack) -> None:
    client = connect("viewer")
    async with stack.client(role="submitter") as submitter:
        task = await submit(submitter, queue())
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still pending"):
        await client.wait_for_result(task["id"], timeout=1.5)
    assert 1.4 < time.monotonic() - started < 4


async def test_stream_resumes_after_a_dropped_connection_without_gaps_or_repeats(
    connect: Connect, stack: Stack
) -> None:
    q = queue()
    async with stack.client(role="submitter") as submitter:
        task = await submit(submitter, q)
    async with stack.client(role="worker") as worker:
        claimed = await claim(worker, q)
        assert claimed is not None
        lease = {"worker_id": "w1", "lease_id": claimed["lease"]["id"]}
        for _ in range(2):
            assert (await worker.post(f"/v1/tasks/{task['id']}/heartbeat", json=lease)).status_code == 200
        assert (await worker.post(f"/v1/tasks/{task['id']}/complete", json={**lease, "result": 7})).status_code == 200
    expected = ["TaskSubmitted", "TaskClaimed", "TaskHeartbeat", "TaskHeartbeat", "TaskCompleted"]

    faults = Faults(lambda request: Cut(events=2) if len(faults.requests) == 1 else None)
    client = connect("viewer", transport=faults)
    events = await client.take(5, task_id=task["id"])
    assert [event.type for event in events] == expected
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs)), "in log order, none twice"
    assert [r.headers.get("last-event-id") for r in faults.requests] == [None, str(seqs[1])]
    assert events[-1].data["result"] == 7 and all(event.data["aggregate_id"] == task["id"] for event in events)

    later = await client.take(1, task_id=task["id"], after=seqs[1])
    assert later[0].seq == seqs[2], "after= starts after that sequence"
    completed = await client.take(1, after=seqs[0], types=["TaskCompleted"], queue=q)
    assert (completed[0].type, completed[0].seq) == ("TaskCompleted", seqs[-1]), "the org feed, filtered"
