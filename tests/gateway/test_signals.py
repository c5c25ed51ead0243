"""Signals over the real stack: ``POST /v1/tasks/{id}/signals`` (who may, what is refused and appends
nothing, idempotent retries, the SSE feed), and workflows that wait for them durably: a signal sent
before the wait is kept and delivered, one sent later wakes the workflow, a timeout returns None, and a
wait outlives the runner that started it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from application.forms import MAX_SIGNAL_PAYLOAD_BYTES
from core.domain.ids import new_id
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from tests.gateway.conftest import Stack
from tests.gateway.test_api import _read_sse, appended_since, claim, last_seq, problem, queue, submit
from tests.gateway.test_runner import running, until

pytestmark = pytest.mark.integration


async def send(
    c: httpx.AsyncClient, task_id: str, name: str = "go", payload: Any = None, **headers: str
) -> httpx.Response:
    body: dict[str, Any] = {"name": name} if payload is None else {"name": name, "payload": payload}
    return await c.post(f"/v1/tasks/{task_id}/signals", json=body, headers=headers)


async def test_a_signal_is_accepted_with_its_seq_and_kept_in_the_task(stack: Stack) -> None:
    async with stack.client(role="submitter") as c:
        task = await submit(c, queue())
        before = task["seq"]
        r = await send(c, task["id"], "approve", {"note": "ship it", "big": 2**70})
        assert r.status_code == 202, r.text
        assert r.json() == {"seq": (await appended_since(stack, before))[-1].seq}
        default = await send(c, task["id"], "approve")
        assert default.status_code == 202
        shown = (await c.get(f"/v1/tasks/{task['id']}")).json()
    assert shown["status"] == "pending", "a signal changes no status"
    assert [(s["name"], s["payload"]) for s in shown["signals"]] == [
        ("approve", {"note": "ship it", "big": 2**70}),
        ("approve", {}),
    ]
    assert shown["signals"][0]["by"].startswith("key:")
    assert shown["signal_wait"] is None


async def test_who_may_signal_and_what_is_refused_appends_nothing(stack: Stack) -> None:
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        stack.client(role="worker") as worker,
        stack.client(role="viewer") as viewer,
        stack.client("globex") as other_org,
        httpx.AsyncClient(base_url=stack.url) as nobody,
    ):
        task = await submit(admin, queue())
        assert (await send(approver, task["id"])).status_code == 202
        before = await last_seq(stack)
        problem(await send(nobody, task["id"]), 401)
        problem(await send(worker, task["id"]), 403)
        problem(await send(viewer, task["id"]), 403)
        problem(await send(admin, "no-such-task"), 404)
        problem(await send(admin, "NOT A TOKEN"), 404)
        problem(await send(other_org, task["id"]), 404)
        problem(await send(admin, task["id"], "Not A Name"), 422)
        problem(await send(admin, task["id"], "x" * 64), 422)
        problem(await send(admin, task["id"], "go", "x" * (MAX_SIGNAL_PAYLOAD_BYTES + 1)), 422)
        deep: Any = []
        for _ in range(200):
            deep = [deep]
        problem(await send(admin, task["id"], "go", deep), 422)
        problem(await send(admin, task["id"], "go", {"text": "nul \x00"}), 422)
        malformed = await admin.post(
            f"/v1/tasks/{task['id']}/signals", content=b"{not json", headers={"content-type": "application/json"}
        )
        problem(malformed, 400)
        problem(await admin.post(f"/v1/tasks/{task['id']}/signals", json=["go"]), 400)
        assert await appended_since(stack, before) == [], "nothing refused was appended"

        assert (await admin.post(f"/v1/tasks/{task['id']}/cancel", json={})).status_code == 200
        terminal = problem(await send(admin, task["id"]), 409)
        assert "cancelled" in terminal["detail"]


async def test_a_retried_signal_with_the_same_key_is_recorded_once(stack: Stack) -> None:
    async with stack.client(role="submitter") as c:
        task = await submit(c, queue())
        first = await send(c, task["id"], "input", {"n": 1}, **{"Idempotency-Key": "sig-1"})
        seq = await last_seq(stack)
        again = await send(c, task["id"], "input", {"n": 1}, **{"Idempotency-Key": "sig-1"})
        assert again.status_code == 202
        assert again.json()["seq"] == first.json()["seq"]
        assert await appended_since(stack, seq) == []
        other = await send(c, task["id"], "input", {"n": 2}, **{"Idempotency-Key": "sig-2"})
        assert other.json()["seq"] > seq
        shown = (await c.get(f"/v1/tasks/{task['id']}")).json()
    assert [s["payload"] for s in shown["signals"]] == [{"n": 1}, {"n": 2}]


async def test_the_org_feed_and_the_task_stream_carry_the_signal(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        task = await submit(c, q)
        after = await last_seq(stack)
        async with c.stream("GET", "/v1/events", params={"after": after, "types": "TaskSignalled", "queue": q}) as rsp:
            reading = asyncio.create_task(_read_sse(rsp, 1))
            sent = await send(c, task["id"], "approve", {"ok": True})
            [event] = await asyncio.wait_for(reading, 5)
        assert event["event"] == "TaskSignalled"
        assert event["id"] == str(sent.json()["seq"])
        assert '"name":"approve"' in event["data"] and '"payload":{"ok":true}' in event["data"]
        async with c.stream("GET", f"/v1/tasks/{task['id']}/events", params={"after": after}) as rsp:
            [own] = await asyncio.wait_for(_read_sse(rsp, 1), 5)
        assert own["event"] == "TaskSignalled"


async def test_a_lease_bound_wait_takes_a_kept_signal_at_once_or_releases_the_lease(stack: Stack) -> None:
    """The raw endpoint a runner's ``wait_for_signal`` uses, and that a waiting task is never claimed."""
    q = queue()
    async with stack.client() as admin, stack.client(role="worker") as worker:
        task = await submit(admin, q)
        await send(admin, task["id"], "go", {"n": 1})
        leased = await claim(worker, q)
        assert leased is not None
        lease = {"worker_id": "w1", "lease_id": leased["lease"]["id"]}
        taken = await worker.post(f"/v1/tasks/{task['id']}/signal-waits", json={**lease, "index": 0, "name": "go"})
        assert taken.status_code == 200, taken.text
        assert taken.json()["waiting"] is False
        assert taken.json()["signal"]["payload"] == {"n": 1}
        problem(
            await worker.post(f"/v1/tasks/{task['id']}/signal-waits", json={**lease, "index": 0, "name": "go"}), 422
        )
        waits = await worker.post(
            f"/v1/tasks/{task['id']}/signal-waits", json={**lease, "index": 1, "name": "go", "timeout_seconds": 600}
        )
        assert waits.json() == {"index": 1, "waiting": True, "signal": None, "seq": waits.json()["seq"]}
        shown = (await admin.get(f"/v1/tasks/{task['id']}")).json()
        assert shown["status"] == "pending" and shown["lease"] is None
        assert shown["signal_wait"]["name"] == "go" and shown["signal_wait"]["index"] == 1
        assert await claim(worker, q) is None, "a task waiting for a signal is not handed to a worker"
        await send(admin, task["id"], "go", {"n": 2})
        again = await claim(worker, q)
        assert again is not None, "the signal opened the task"
        assert again["task"]["journal"][-1]["result"]["payload"] == {"n": 2}


# --- workflows ----------------------------------------------------------------------------------------

steps: list[str] = []


def note(what: str, *, idempotency_key: str) -> str:
    steps.append(idempotency_key)
    return what


@workflow("await-go", version=1)
async def await_go(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    await ctx.step("before", note, "before")
    first = await ctx.wait_for_signal("go", timeout_seconds=payload.get("timeout_seconds"))
    second = (
        await ctx.wait_for_signal("go", timeout_seconds=payload.get("timeout_seconds"))
        if payload.get("twice")
        else None
    )
    return {"first": first, "second": second}


def workflow_task(q: str, **payload: Any) -> dict[str, Any]:
    return {"type": "await-go", "queue": q, "workflow": {"name": "await-go", "version": 1}, "payload": payload}


async def reaches(c: httpx.AsyncClient, task_id: str, check: Any, within: float = 15) -> dict[str, Any]:
    latest: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal latest
        latest = (await c.get(f"/v1/tasks/{task_id}")).json()
        return bool(check(latest))

    await until(done, within)
    return latest


def waiting(task: dict[str, Any]) -> bool:
    return task["signal_wait"] is not None


async def test_signals_sent_before_the_wait_are_delivered_in_order_once(stack: Stack) -> None:
    q = f"wf{new_id()[-8:]}"
    async with stack.client(role="submitter") as c:
        task = (await c.post("/v1/tasks", json=workflow_task(q, twice=True))).json()
        for n in (1, 2, 3):
            assert (await send(c, task["id"], "go", {"n": n})).status_code == 202
        async with running(stack, Registry([await_go]), q):
            done = await reaches(c, task["id"], lambda t: t["status"] == "completed")
    assert done["result"]["first"]["payload"] == {"n": 1}
    assert done["result"]["second"]["payload"] == {"n": 2}
    assert [s["payload"] for s in done["signals"]] == [{"n": 3}], "the third is kept for a later wait"
    assert [(e["kind"], e["name"]) for e in done["journal"]] == [("step", "before"), ("signal", "go"), ("signal", "go")]


async def test_a_signal_sent_during_the_wait_wakes_the_workflow(stack: Stack) -> None:
    q = f"wf{new_id()[-8:]}"
    async with stack.client(role="approver") as c, running(stack, Registry([await_go]), q):
        async with stack.client() as admin:
            task = (await admin.post("/v1/tasks", json=workflow_task(q))).json()
        parked = await reaches(c, task["id"], waiting)
        assert parked["status"] == "pending" and parked["lease"] is None
        await asyncio.sleep(0.5)  # the runner keeps claiming: it must not pick the waiting task up
        assert (await c.get(f"/v1/tasks/{task['id']}")).json()["signal_wait"] is not None
        await send(c, task["id"], "go", {"answer": 42})
        done = await reaches(c, task["id"], lambda t: t["status"] == "completed")
    assert done["result"]["first"]["payload"] == {"answer": 42}
    assert done["result"]["first"]["name"] == "go"


async def test_two_signals_sent_while_the_workflow_waits_reach_its_two_waits_in_order(stack: Stack) -> None:
    """Each signal sent while the workflow waits for it (the first wakes the first wait, the second the
    second), and two sent back to back while it waits for the first (one wakes it, the other is kept
    for the second wait): either way the first wait gets the first signal and the second the second."""
    q = f"wf{new_id()[-8:]}"
    async with stack.client() as c, running(stack, Registry([await_go]), q):
        one_by_one = (await c.post("/v1/tasks", json=workflow_task(q, twice=True))).json()
        back_to_back = (await c.post("/v1/tasks", json=workflow_task(q, twice=True))).json()
        await reaches(c, one_by_one["id"], lambda t: waiting(t) and t["signal_wait"]["index"] == 1)
        await send(c, one_by_one["id"], "go", {"n": 1})
        await reaches(c, one_by_one["id"], lambda t: waiting(t) and t["signal_wait"]["index"] == 2)
        await send(c, one_by_one["id"], "go", {"n": 2})
        await reaches(c, back_to_back["id"], lambda t: waiting(t) and t["signal_wait"]["index"] == 1)
        for n in (1, 2):
            assert (await send(c, back_to_back["id"], "go", {"n": n})).status_code == 202
        done = [
            await reaches(c, task["id"], lambda t: t["status"] == "completed") for task in (one_by_one, back_to_back)
        ]
    for task in done:
        assert task["result"]["first"]["payload"] == {"n": 1}
        assert task["result"]["second"]["payload"] == {"n": 2}
        assert [(e["index"], e["kind"]) for e in task["journal"]] == [(0, "step"), (1, "signal"), (2, "signal")]
        assert task["signals"] == [], "each signal was delivered once"


async def test_a_wait_that_times_out_returns_none(stack: Stack) -> None:
    q = f"wf{new_id()[-8:]}"
    async with stack.client() as c, running(stack, Registry([await_go]), q):
        task = (await c.post("/v1/tasks", json=workflow_task(q, timeout_seconds=0.5))).json()
        done = await reaches(c, task["id"], lambda t: t["status"] == "completed")
    assert done["result"] == {"first": None, "second": None}
    assert done["journal"][-1]["kind"] == "signal" and done["journal"][-1]["result"] is None


async def test_a_waiting_workflow_outlives_its_runner(stack: Stack) -> None:
    steps.clear()
    q = f"wf{new_id()[-8:]}"
    async with stack.client() as c:
        task = (await c.post("/v1/tasks", json=workflow_task(q))).json()
        async with running(stack, Registry([await_go]), q):
            await reaches(c, task["id"], waiting)
        # no runner lives now: the signal is recorded as the wait's result all the same
        await send(c, task["id"], "go", {"after": "restart"})
        async with running(stack, Registry([await_go]), q):
            done = await reaches(c, task["id"], lambda t: t["status"] == "completed")
    assert done["result"]["first"]["payload"] == {"after": "restart"}
    assert steps == [f"{task['id']}:0"], "the replay answered the step from the journal"
