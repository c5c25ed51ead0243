"""Issue 14, finding 15: the context stops a workflow with exceptions its own ``except Exception`` cannot
catch. A workflow that wraps ``ctx.sleep()`` in ``try/except Exception`` still suspends, and its next
step runs once, after the wake-up time; one that hides a non-determinism is parked all the same; one
whose lease is lost mid-step runs nothing more."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from core.domain.ids import new_id
from runners.context import ControlFlow, Interrupted, NonDeterminism, Suspended, WorkflowContext
from runners.registry import Registry, workflow
from tests.gateway.conftest import Stack
from tests.gateway.test_runner import running, until
from tests.security.test_lease_binding import security_stack  # noqa: F401  (fixture `stack`)

pytestmark = pytest.mark.integration


def test_control_flow_is_not_an_exception_a_workflow_catches() -> None:
    for raised in (Suspended, NonDeterminism, Interrupted):
        assert issubclass(raised, ControlFlow) and issubclass(raised, BaseException)
        assert not issubclass(raised, Exception), raised


async def submit(stack: Stack, name: str) -> tuple[str, str]:
    queue = f"cf{new_id()[-10:]}"
    async with stack.client() as admin:
        body = {"type": name, "queue": queue, "workflow": {"name": name, "version": 1}, "max_retries": 3}
        created = await admin.post("/v1/tasks", json=body)
    assert created.status_code == 201, created.text
    return created.json()["id"], queue


async def fetch(stack: Stack, task_id: str) -> dict[str, Any]:
    async with stack.client() as admin:
        return (await admin.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]


async def test_a_workflow_catching_exception_around_sleep_still_suspends_and_its_next_step_waits(stack: Stack) -> None:
    swallowed: list[str] = []
    after_sleep: list[datetime] = []

    def then(*, idempotency_key: str) -> str:
        after_sleep.append(datetime.now(UTC))
        return "ran"

    @workflow("naps-carelessly", version=1)
    async def naps_carelessly(ctx: WorkflowContext, payload: Any) -> str:
        try:
            await ctx.sleep(1.0)
        except Exception as exc:  # the mistake this finding is about
            swallowed.append(repr(exc))
        return str(await ctx.step("then", then))

    task_id, queue = await submit(stack, "naps-carelessly")
    async with running(stack, Registry([naps_carelessly]), queue):

        async def completed() -> bool:
            return (await fetch(stack, task_id))["status"] == "completed"

        await until(completed)
    done = await fetch(stack, task_id)
    assert swallowed == [], "the suspension never reached the workflow's except clause"
    assert [e["kind"] for e in done["journal"]] == ["sleep", "step"]
    wake_up = datetime.fromisoformat(done["journal"][0]["result"])
    assert len(after_sleep) == 1, "the step after the sleep ran once, not early and then again"
    assert after_sleep[0] >= wake_up, "the step after the sleep did not run before the wake-up time"
    assert done["result"] == "ran" and done["retries"] == 0


async def test_a_workflow_catching_exception_cannot_hide_a_non_determinism(stack: Stack) -> None:
    @workflow("drifts", version=1)
    async def before(ctx: WorkflowContext, payload: Any) -> str:
        await ctx.step("fetch", lambda *, idempotency_key: 1)
        await ctx.request_approval("go on?")
        return "done"

    @workflow("drifts", version=1)
    async def after(ctx: WorkflowContext, payload: Any) -> str:
        try:
            await ctx.step("fetch-v2", lambda *, idempotency_key: 2)  # not what the journal holds
        except Exception:
            return "guessed"
        return "done"

    task_id, queue = await submit(stack, "drifts")
    async with running(stack, Registry([before]), queue):

        async def waiting() -> bool:
            return (await fetch(stack, task_id))["status"] == "awaiting_approval"

        await until(waiting)
    approval = (await fetch(stack, task_id))["approvals"][0]
    async with stack.client(role="approver") as approver:
        assert (await approver.post(f"/v1/approvals/{approval['id']}/approve")).status_code == 200
    async with running(stack, Registry([after]), queue):

        async def parked_or_done() -> bool:
            task = await fetch(stack, task_id)
            return task["parked"] is not None or task["status"] == "completed"

        await until(parked_or_done)
    stuck = await fetch(stack, task_id)
    assert stuck["result"] is None and stuck["status"] == "pending"
    assert "non-deterministic at operation 0" in stuck["parked"]


async def test_a_workflow_catching_exception_runs_nothing_more_once_its_lease_is_lost(stack: Stack) -> None:
    """The task is cancelled while a step runs: recording the step is refused (409), and the step after
    it must not run for real on a task the runner no longer holds."""
    started, release = asyncio.Event(), asyncio.Event()
    effects: list[str] = []

    async def slow(*, idempotency_key: str) -> str:
        started.set()
        await release.wait()
        effects.append("first")
        return "first"

    def second(*, idempotency_key: str) -> str:
        effects.append("second")
        return "second"

    @workflow("outlived", version=1)
    async def outlived(ctx: WorkflowContext, payload: Any) -> str:
        try:
            await ctx.step("first", slow)
        except Exception:
            effects.append("swallowed")
        return str(await ctx.step("second", second))

    task_id, queue = await submit(stack, "outlived")
    async with running(stack, Registry([outlived]), queue):
        await asyncio.wait_for(started.wait(), 15)
        async with stack.client() as admin:
            assert (
                await admin.post(f"/v1/tasks/{task_id}/cancel", json={"reason": "changed my mind"})
            ).status_code == 200
        release.set()
        await asyncio.sleep(0.5)
    assert effects == ["first"], "nothing ran after the refused recording"
    assert (await fetch(stack, task_id))["status"] == "cancelled"
