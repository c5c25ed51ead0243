"""Durable workflows over the real stack: a workflow waits for a human and a timer, a later claim
replays its journal (no step or LLM call runs twice), and changed code is parked, not guessed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import litellm
import orjson
import pytest

from core.domain.ids import new_id
from policies_wasm import default_bundle
from runners.client import TaskApi
from runners.context import PolicyDenied, WorkflowContext
from runners.examples import EXAMPLES
from runners.policies import Policies
from runners.registry import Registry, workflow
from runners.runner import Runner
from tests.gateway.conftest import Stack

pytestmark = pytest.mark.integration

calls: Counter[str] = Counter()
idempotency_keys: list[str] = []


def make_plan(payload: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
    calls["plan"] += 1
    idempotency_keys.append(idempotency_key)
    return {"steps": ["build", "ship"], "env": payload["env"]}


async def ship(plan: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
    calls["ship"] += 1
    idempotency_keys.append(idempotency_key)
    return {"shipped": plan["steps"]}


@workflow("hitl-deploy", version=1)
async def hitl_deploy(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    plan = await ctx.step("plan", make_plan, payload)
    summary = await ctx.llm(
        "summarise",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "summarise"}],
        mock_response="build, then ship to prod",
    )
    decision = await ctx.request_approval(f"deploy to {plan['env']}: {summary['content']}")
    if decision["status"] != "approved":
        return {"deployed": False, "because": decision["status"]}
    await ctx.sleep(0.3)
    return {"deployed": True, **await ctx.step("ship", ship, plan)}


@contextlib.asynccontextmanager
async def running(
    stack: Stack, registry: Registry, queue: str, policies: Policies | None = None, *, worker_key: str | None = None
) -> AsyncIterator[None]:
    api = TaskApi(stack.url, worker_key or stack.keys["acme"]["worker"])
    runner = Runner(
        api,
        registry,
        worker_id=f"runner-{new_id()[-6:]}",
        queue=queue,
        block_ms=300,
        lease_seconds=10,
        policies=policies,
    )
    stop = asyncio.Event()
    job = asyncio.create_task(runner.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(job, 10)
        await api.close()


async def until(check: Callable[[], Awaitable[bool]], within: float = 15) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


async def test_a_workflow_waits_for_a_human_and_a_timer_and_never_repeats_a_step(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls.clear()
    idempotency_keys.clear()
    real_completion = litellm.acompletion

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls["llm"] += 1
        return await real_completion(*args, **kwargs)

    monkeypatch.setattr(litellm, "acompletion", counted)
    queue = f"wf{new_id()[-8:]}"
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        running(stack, Registry([hitl_deploy]), queue),
    ):
        task = (
            await admin.post(
                "/v1/tasks",
                json={
                    "type": "hitl-deploy",
                    "queue": queue,
                    "payload": {"env": "prod"},
                    "workflow": {"name": "hitl-deploy", "version": 1},
                },
            )
        ).json()
        assert "workflow:hitl-deploy@v1" in task["required_capabilities"]

        async def state() -> dict[str, Any]:
            return (await admin.get(f"/v1/tasks/{task['id']}")).json()

        async def waiting_for_a_human() -> bool:
            return (await state())["status"] == "awaiting_approval"

        await until(waiting_for_a_human)
        waiting = await state()
        assert [e["kind"] for e in waiting["journal"]] == ["step", "policy", "llm", "approval"]
        model_check = waiting["journal"][1]["result"]
        assert model_check["entrypoint"] == "controlplane/tool"
        assert model_check["value"]["allow"] is True
        assert model_check["bundle_digest"].startswith("sha256:")
        llm_call = waiting["journal"][2]["result"]
        assert llm_call["content"] == "build, then ship to prod"
        assert llm_call["request"] == {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "summarise"}],
            "options": {"mock_response": "build, then ship to prod"},
        }
        assert llm_call["provider"] == "openai"
        assert llm_call["usage"]["completion_tokens"] > 0
        approval = waiting["approvals"][0]
        assert approval["reason"] == "deploy to prod: build, then ship to prod"
        assert (await approver.post(f"/v1/approvals/{approval['id']}/approve")).status_code == 200

        async def completed() -> bool:
            return (await state())["status"] == "completed"

        await until(completed)
        done = await state()
    assert done["result"] == {"deployed": True, "shipped": ["build", "ship"]}
    assert [e["kind"] for e in done["journal"]] == ["step", "policy", "llm", "approval", "sleep", "step"]
    assert calls == Counter({"plan": 1, "llm": 1, "ship": 1}), "replays answered from the journal"
    assert idempotency_keys == [f"{task['id']}:0", f"{task['id']}:5"]


async def test_changed_workflow_code_parks_the_task_instead_of_guessing(stack: Stack) -> None:
    @workflow("drift", version=1)
    async def before(ctx: WorkflowContext, payload: Any) -> str:
        await ctx.step("fetch", lambda *, idempotency_key: 1)
        await ctx.request_approval("go on?")
        return "done"

    @workflow("drift", version=1)
    async def after(ctx: WorkflowContext, payload: Any) -> str:
        await ctx.step("fetch-v2", lambda *, idempotency_key: 2)  # renamed: not what the journal holds
        return "done"

    queue = f"wf{new_id()[-8:]}"
    async with stack.client() as admin, stack.client(role="approver") as approver:
        task = (
            await admin.post(
                "/v1/tasks", json={"type": "drift", "queue": queue, "workflow": {"name": "drift", "version": 1}}
            )
        ).json()

        async def state() -> dict[str, Any]:
            return (await admin.get(f"/v1/tasks/{task['id']}")).json()

        async def waiting() -> bool:
            return (await state())["status"] == "awaiting_approval"

        async with running(stack, Registry([before]), queue):
            await until(waiting)
        approval = (await state())["approvals"][0]
        await approver.post(f"/v1/approvals/{approval['id']}/approve")

        async def parked() -> bool:
            return (await state())["parked"] is not None

        async with running(stack, Registry([after]), queue):
            await until(parked)
        stuck = await state()
        assert stuck["status"] == "pending"
        assert "non-deterministic at operation 0" in stuck["parked"]
        assert [e["name"] for e in stuck["journal"]] == ["fetch", "approval"], "nothing was guessed or rewritten"
        resumed = await admin.post(f"/v1/tasks/{task['id']}/resume")
        assert resumed.status_code == 200
        assert resumed.json()["parked"] is None


async def test_the_shipped_examples_run_end_to_end(stack: Stack) -> None:
    queue = f"wf{new_id()[-8:]}"
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        running(stack, Registry(EXAMPLES), queue),
    ):

        async def submit(name: str, payload: dict[str, Any]) -> str:
            body = {"type": name, "queue": queue, "workflow": {"name": name}, "payload": payload}
            return str((await admin.post("/v1/tasks", json=body)).json()["id"])

        async def reaches(task_id: str, status: str) -> dict[str, Any]:
            async def check() -> bool:
                return (await admin.get(f"/v1/tasks/{task_id}")).json()["status"] == status

            await until(check)
            return (await admin.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]

        staging = await reaches(await submit("agent-deploy", {"environment": "staging"}), "completed")
        assert staging["result"]["executed"] is True
        assert [e["name"] for e in staging["journal"]] == [
            "controlplane/tool",
            "plan",
            "controlplane/submit",
            "execute",
            "controlplane/tool",
            "report",
        ]
        assert staging["journal"][2]["result"]["value"] == {"allow": True, "require_approval": False, "reasons": []}

        prod_id = await submit("agent-deploy", {"environment": "prod"})
        waiting = await reaches(prod_id, "awaiting_approval")
        assert "prod" in waiting["approvals"][0]["reason"]
        assert waiting["journal"][-2]["result"]["value"]["require_approval"] is True
        await approver.post(f"/v1/approvals/{waiting['approvals'][0]['id']}/approve")
        assert (await reaches(prod_id, "completed"))["result"]["executed"] is True

        change_id = await submit("two-person-change", {"escalate_after_seconds": 0.5, "timeout_seconds": 60})
        approval = (await reaches(change_id, "awaiting_approval"))["approvals"][0]
        assert approval["quorum"] == 2
        await approver.post(f"/v1/approvals/{approval['id']}/approve")
        await asyncio.sleep(0.8)  # escalated: admins may now decide too
        assert (await admin.post(f"/v1/approvals/{approval['id']}/approve")).json()["status"] == "approved"
        assert (await reaches(change_id, "completed"))["result"]["decision"] == "approved"


async def test_an_approval_decided_while_no_runner_lives_is_not_lost(stack: Stack) -> None:
    queue = f"wf{new_id()[-8:]}"
    async with stack.client() as admin, stack.client(role="approver") as approver:
        task_id = (
            await admin.post(
                "/v1/tasks",
                json={"type": "two-person-change", "queue": queue, "workflow": {"name": "two-person-change"}},
            )
        ).json()["id"]

        async def status_is(status: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return (await admin.get(f"/v1/tasks/{task_id}")).json()["status"] == status

            return check

        async with running(stack, Registry(EXAMPLES), queue):
            await until(await status_is("awaiting_approval"))
        approval_id = (await admin.get(f"/v1/tasks/{task_id}")).json()["approvals"][0]["id"]
        await approver.post(f"/v1/approvals/{approval_id}/approve")
        assert (await admin.post(f"/v1/approvals/{approval_id}/approve")).json()["status"] == "approved"
        async with running(stack, Registry(EXAMPLES), queue):
            await until(await status_is("completed"))
        assert (await admin.get(f"/v1/tasks/{task_id}")).json()["result"]["decision"] == "approved"


LEASE_EVENTS = {"TaskClaimed", "TaskHeartbeat", "TaskLeaseExpired", "TaskRetryDue"}
KILL_POINTS = {  # label -> payload: where the doomed runner is when it is killed
    "in-step": {"hang_in": "step"},
    "in-llm-hang-in-llm": {},
    "awaiting-approval": {},
    "sleeping": {},
}


async def test_runners_killed_in_every_kind_of_operation_are_replaced_without_repeating_anything(
    stack: Stack, tmp_path: Path
) -> None:
    """One runner is kill -9'd while it holds a task inside a step, one inside an LLM call, one waiting
    for a human and one sleeping. Another runner finishes them all; each side effect lands once per
    key, no recorded step or LLM call runs again, and each journal equals that of the same workflow
    run without a crash (its twin on another queue) but for claim and lease events."""
    crashed_queue, calm_queue = f"wf{new_id()[-8:]}", f"wf{new_id()[-8:]}"
    crashed_sink, calm_sink = tmp_path / "crashed.log", tmp_path / "calm.log"
    repo = Path(__file__).parents[2]

    def start_runner(name: str, queue: str, sink: Path, *, hang: bool = False) -> subprocess.Popen[bytes]:
        """A real runner process; the workflows live in this test package, so it gets the repo on its path."""
        sink.touch()
        command = [str(Path(sys.executable).parent / "controlplane"), "runner", "--url", stack.url]
        command += ["--queue", queue, "--worker-id", name]
        command += ["--workflows", "tests.gateway.crash_workflows:ALL", "--lease-seconds", "2", "--concurrency", "8"]
        environment = {**os.environ, "PYTHONPATH": str(repo), "CP_CRASH_SINK": str(sink)}
        environment["CP_WORKER_KEY"] = stack.keys["acme"]["worker"]
        if hang:
            environment["CP_CRASH_HANG"] = "1"
        log = (tmp_path / f"{name}.log").open("wb")
        return subprocess.Popen(command, stdout=log, stderr=log, cwd=repo, env=environment)

    async def stop(runner: subprocess.Popen[bytes]) -> None:
        runner.terminate()  # drains: its last calls go to the gateway served by this very event loop
        await asyncio.to_thread(runner.wait, 15)

    async with stack.client() as admin, stack.client(role="approver") as approver:

        async def submit(queue: str) -> dict[str, str]:
            ids = {}
            for label, extra in KILL_POINTS.items():
                body = {"type": "all-operations", "queue": queue, "workflow": {"name": "all-operations", "version": 1}}
                body["payload"] = {"label": label, "sleep_seconds": 3, **extra}
                ids[label] = (await admin.post("/v1/tasks", json=body)).json()["id"]
            return ids

        async def fetch(task_id: str) -> dict[str, Any]:
            return (await admin.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]

        async def approve_waiting(task: dict[str, Any]) -> None:
            for approval in task["approvals"]:
                if approval["status"] == "pending":
                    await approver.post(f"/v1/approvals/{approval['id']}/approve")

        crashed = await submit(crashed_queue)
        doomed = start_runner("doomed", crashed_queue, crashed_sink, hang=True)
        try:

            async def every_kill_point_reached() -> bool:
                assert doomed.poll() is None, (tmp_path / "doomed.log").read_text()[-2000:]
                effects = crashed_sink.read_text().splitlines()
                sleeping = await fetch(crashed["sleeping"])
                if sleeping["status"] == "awaiting_approval":
                    await approve_waiting(sleeping)
                return (
                    f"started {crashed['in-step']}:3" in effects
                    and "llm in-llm-hang-in-llm" in effects
                    and (await fetch(crashed["awaiting-approval"]))["status"] == "awaiting_approval"
                    and [e["kind"] for e in sleeping["journal"]][-1:] == ["sleep"]
                )

            await until(every_kill_point_reached, within=30)
            doomed.kill()
        finally:
            await asyncio.to_thread(doomed.wait, 10)
        calm = await submit(calm_queue)
        heir = start_runner("heir", crashed_queue, crashed_sink)
        twin = start_runner("twin", calm_queue, calm_sink)
        try:

            async def all_completed() -> bool:
                tasks = [await fetch(task_id) for task_id in [*crashed.values(), *calm.values()]]
                for task in tasks:
                    await approve_waiting(task)
                return all(task["status"] == "completed" for task in tasks)

            await until(all_completed, within=60)
        finally:
            await asyncio.gather(stop(heir), stop(twin))

        for label in KILL_POINTS:
            resumed, uninterrupted = await fetch(crashed[label]), await fetch(calm[label])
            assert resumed["result"]["decision"] == "approved"
            assert _journal(resumed) == _journal(uninterrupted), label
            assert await _history(stack, resumed) == await _history(stack, uninterrupted), label

    effects = crashed_sink.read_text().splitlines()
    for label, task_id in crashed.items():
        keys = [f"{task_id}:{index}" for index in (0, 3, 6)]
        assert sorted(e for e in effects if e.startswith("done ") and task_id in e) == [f"done {k}" for k in keys]
        runs_of_slow_step = effects.count(f"started {keys[1]}")
        assert runs_of_slow_step == (2 if label == "in-step" else 1), "only an interrupted step runs again"
        assert effects.count(f"started {keys[0]}") == 1, "a recorded step is replayed, not re-run"
        llm_calls = effects.count(f"llm {label}")
        assert llm_calls == (2 if label == "in-llm-hang-in-llm" else 1), "only an interrupted LLM call runs again"


def _journal(task: dict[str, Any]) -> list[Any]:
    """The journal without times (when each entry was recorded, when a sleep ends, how long a policy
    took), with the task's own id (in idempotency keys and approval ids) taken out, and without the
    digest of each policy input (it covers the queue, which differs between the twins)."""
    entries = [
        {
            "index": e["index"],
            "kind": e["kind"],
            "name": e["name"],
            "result": None if e["kind"] == "sleep" else e["result"],
        }
        for e in task["journal"]
    ]
    for entry in entries:
        if entry["kind"] == "policy":
            entry["result"] = {**entry["result"], "duration_ms": None, "input_digest": None}
    return orjson.loads(orjson.dumps(entries).replace(task["id"].encode(), b"<task>"))  # type: ignore[no-any-return]


async def _history(stack: Stack, task: dict[str, Any]) -> list[str]:
    recorded = await stack.services.handler.history("acme", "task", task["id"])
    return [type(r.event).__name__ for r in recorded if type(r.event).__name__ not in LEASE_EVENTS]


async def test_a_task_naming_no_workflow_version_is_pinned_to_the_newest_hosted_one(stack: Stack) -> None:
    @workflow("pin-me", version=1)
    async def first(ctx: WorkflowContext, payload: Any) -> int:
        return 1

    @workflow("pin-me", version=2)
    async def second(ctx: WorkflowContext, payload: Any) -> int:
        return 2

    queue = f"wf{new_id()[-8:]}"
    body = {"type": "pin-me", "queue": queue, "workflow": {"name": "pin-me"}}
    async with stack.client() as admin:

        async def fetch(task_id: str) -> dict[str, Any]:
            return (await admin.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]

        before_any_runner = (await admin.post("/v1/tasks", json=body)).json()
        assert before_any_runner["workflow"] == {"name": "pin-me", "version": None}
        async with running(stack, Registry([first, second]), queue):

            async def runner_known() -> bool:
                found = await admin.get("/v1/workers", params={"queue": queue, "capability": "workflow:pin-me@v2"})
                return bool(found.json()["items"])

            await until(runner_known)
            while_hosted = (await admin.post("/v1/tasks", json=body)).json()
            assert while_hosted["workflow"] == {"name": "pin-me", "version": 2}
            assert while_hosted["required_capabilities"] == ["workflow:pin-me@v2"]

            async def both_done() -> bool:
                statuses = [(await fetch(t["id"]))["status"] for t in (before_any_runner, while_hosted)]
                return statuses == ["completed", "completed"]

            await until(both_done)
        pinned_by_claim = await fetch(before_any_runner["id"])
    assert pinned_by_claim["workflow"] == {"name": "pin-me", "version": 2}
    assert pinned_by_claim["result"] == 2


async def test_a_denied_tool_never_runs_and_one_needing_approval_waits_for_a_human(stack: Stack) -> None:
    ran: list[str] = []

    def use(tool: str, *, idempotency_key: str) -> str:
        ran.append(tool)
        return tool

    @workflow("guarded", version=1)
    async def guarded(ctx: WorkflowContext, payload: Any) -> dict[str, Any]:
        try:
            await ctx.step("wipe", use, "rm-rf", tool="rm-rf")
            denied: list[str] = []
        except PolicyDenied as exc:
            denied = exc.reasons
        return {"denied": denied, "shipped": await ctx.step("ship", use, "deploy", tool="deploy")}

    shipped = default_bundle()
    config = shipped.data["policy_config"]
    settings = {"settings": {"denied_tools": ["rm-rf"], "approval_tools": ["deploy"]}}
    bundle = shipped.with_data({"policy_config": {**config, "orgs": {"acme": settings}}})
    queue = f"wf{new_id()[-8:]}"
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        running(stack, Registry([guarded]), queue, Policies(bundle)),
    ):
        body = {"type": "guarded", "queue": queue, "workflow": {"name": "guarded", "version": 1}}
        task_id = (await admin.post("/v1/tasks", json=body)).json()["id"]

        async def status_is(status: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return (await admin.get(f"/v1/tasks/{task_id}")).json()["status"] == status

            return check

        await until(await status_is("awaiting_approval"))
        waiting = (await admin.get(f"/v1/tasks/{task_id}")).json()
        assert ran == [], "the denied step did not run, the one needing approval has not yet"
        assert [e["kind"] for e in waiting["journal"]] == ["policy", "policy", "approval"]
        assert waiting["journal"][0]["result"]["value"]["allow"] is False
        assert waiting["journal"][1]["result"]["bundle_digest"] == bundle.digest
        await approver.post(f"/v1/approvals/{waiting['approvals'][0]['id']}/approve")
        await until(await status_is("completed"))
        done = (await admin.get(f"/v1/tasks/{task_id}")).json()
    assert ran == ["deploy"]
    assert done["result"]["shipped"] == "deploy"
    assert done["result"]["denied"], "the denial's reasons reach the workflow"
    history = await stack.services.handler.history("acme", "task", task_id)
    assert sum(type(r.event).__name__ == "PolicyDecided" for r in history) == 2


@workflow("by-hand-or-not", version=1)
async def by_hand_or_not(ctx: WorkflowContext, payload: Any) -> str:
    return "ran as a workflow"


async def test_a_runner_leaves_tasks_without_a_workflow_to_other_workers(stack: Stack) -> None:
    queue = f"wf{new_id()[-8:]}"
    async with stack.client() as admin, running(stack, Registry([by_hand_or_not]), queue):
        # Same type as the hosted workflow and no required capabilities: any worker may take it, but
        # a runner has nothing to run it with.
        by_hand = (await admin.post("/v1/tasks", json={"type": "by-hand-or-not", "queue": queue})).json()
        body = {"type": "by-hand-or-not", "queue": queue, "workflow": {"name": "by-hand-or-not", "version": 1}}
        flow = (await admin.post("/v1/tasks", json=body)).json()

        async def flow_done() -> bool:
            return (await admin.get(f"/v1/tasks/{flow['id']}")).json()["status"] == "completed"

        await until(flow_done)
        await asyncio.sleep(0.5)  # a runner's claim long-polls 0.3 s: it had its chances
        assert (await admin.get(f"/v1/tasks/{by_hand['id']}")).json()["status"] == "pending"
        claimed = await admin.post("/v1/tasks/claim", json={"worker_id": "by-hand", "queue": queue})
        assert claimed.json()["task"]["id"] == by_hand["id"], "a plain worker still gets it"
