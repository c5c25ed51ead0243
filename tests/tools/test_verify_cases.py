"""How ``verify`` classifies each way code and journal can part, on histories recorded through the
real command handler and NATS, replayed on workflows written for each case."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from controlplane.task_log import runner_view, task_history
from core.domain.commands import Actor, ClaimTask, CompleteTask, FailTask, RecordOperation, SubmitTask
from core.domain.events import WorkflowRef
from core.domain.history import state_at
from core.domain.ids import new_id
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from runners.verify import verify_task

pytestmark = pytest.mark.integration

WORKER = Actor("w1", frozenset({"worker"}))
effects: Counter[str] = Counter()


def fetch(*, idempotency_key: str) -> int:
    effects["fetch"] += 1
    return 1


def store_it(value: int, *, idempotency_key: str) -> int:
    effects["store"] += 1
    return value + 1


async def record(
    handler: CommandHandler,
    org: str,
    operations: list[tuple[str, Any]],
    *,
    version: int = 1,
    end: str | None = None,
    end_value: Any = None,
) -> str:
    """A task of workflow ``case`` whose runner recorded ``operations`` (name, result) as steps, then
    completed with ``end_value`` (end="complete"), failed with it (end="fail") or still runs (None)."""
    task_id = new_id()
    await handler.handle(
        org,
        SubmitTask(task_id=task_id, task_type="case", workflow=WorkflowRef("case", version)),
        actor=Actor("alice", frozenset({"submitter"})),
    )
    lease = {"worker_id": "w1", "lease_id": f"l{new_id()[-6:]}"}
    await handler.handle(
        org,
        ClaimTask(task_id=task_id, **lease, capabilities=(f"workflow:case@v{version}",), lease_seconds=600),
        actor=WORKER,
    )
    for index, (name, result) in enumerate(operations):
        await handler.handle(
            org,
            RecordOperation(task_id=task_id, **lease, index=index, kind="step", name=name, result=result),
            actor=WORKER,
        )
    if end == "complete":
        await handler.handle(org, CompleteTask(task_id=task_id, **lease, result=end_value), actor=WORKER)
    elif end == "fail":
        await handler.handle(org, FailTask(task_id=task_id, **lease, error=end_value, retryable=False), actor=WORKER)
    return task_id


async def verify(store: JetStreamEventStore, org: str, task_id: str, *workflows: Any, limit: float = 2) -> Any:
    state, seq = state_at(await task_history(store, org, task_id))
    assert state is not None
    return await verify_task(runner_view(state, seq), Registry(workflows), time_limit=limit)


@workflow("case", version=1)
async def two_steps(ctx: WorkflowContext, payload: Any) -> dict[str, int]:
    first = await ctx.step("fetch", fetch)
    return {"stored": await ctx.step("store", store_it, first)}


@workflow("case", version=1)
async def returns_something_else(ctx: WorkflowContext, payload: Any) -> dict[str, int]:
    first = await ctx.step("fetch", fetch)
    return {"stored": await ctx.step("store", store_it, first) * 10}


@workflow("case", version=1)
async def three_steps(ctx: WorkflowContext, payload: Any) -> dict[str, int]:
    first = await ctx.step("fetch", fetch)
    second = await ctx.step("store", store_it, first)
    return {"stored": await ctx.step("store-again", store_it, second)}


@workflow("case", version=1)
async def one_step(ctx: WorkflowContext, payload: Any) -> dict[str, int]:
    return {"stored": await ctx.step("fetch", fetch)}


@workflow("case", version=1)
async def swallows_errors(ctx: WorkflowContext, payload: Any) -> dict[str, int]:
    first = await ctx.step("fetch", fetch)
    try:
        second = await ctx.step("store", store_it, first)
        await ctx.step("store-again", store_it, second)
    except Exception:  # a careless workflow: must not hide the extra operation from verify
        pass
    return {"stored": 2}


@workflow("case", version=1)
async def gives_up(ctx: WorkflowContext, payload: Any) -> None:
    await ctx.step("fetch", fetch)
    raise RuntimeError("nothing to store")


@workflow("case", version=2)
async def next_version(ctx: WorkflowContext, payload: Any) -> None:
    await ctx.step("fetch", fetch)


@workflow("case", version=1)
async def waits_outside_its_context(ctx: WorkflowContext, payload: Any) -> None:
    await ctx.step("fetch", fetch)
    await asyncio.sleep(30)  # a wait no journal can answer


@workflow("case", version=1)
async def times_out_by_itself(ctx: WorkflowContext, payload: Any) -> None:
    await ctx.step("fetch", fetch)
    raise TimeoutError("the upstream did not answer")


STEPS = [("fetch", 1), ("store", 2)]


async def test_a_completed_run_replays_to_its_recorded_result(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    effects.clear()
    task_id = await record(handler, org, STEPS, end="complete", end_value={"stored": 2})
    report = await verify(store, org, task_id, two_steps)
    assert (report.outcome, report.replayed, report.journal) == ("ok", 2, 2)
    assert not effects, "no step ran"


async def test_another_result_diverges_with_both_results(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    task_id = await record(handler, org, STEPS, end="complete", end_value={"stored": 2})
    report = await verify(store, org, task_id, returns_something_else)
    assert report.outcome == "divergence"
    assert (report.recorded, report.code) == ({"stored": 2}, {"stored": 20})


async def test_code_asking_for_more_than_a_completed_run_did_diverges(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    effects.clear()
    task_id = await record(handler, org, STEPS, end="complete", end_value={"stored": 2})
    for careless_or_not in (three_steps, swallows_errors):
        report = await verify(store, org, task_id, careless_or_not)
        assert report.outcome == "divergence", careless_or_not
        assert report.code == {"index": 2, "kind": "step", "name": "store-again"}
        assert report.recorded == {"result": {"stored": 2}}
    assert not effects, "the extra step was refused, not run"


async def test_code_asking_for_more_while_the_task_runs_is_where_a_runner_continues(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    task_id = await record(handler, org, STEPS[:1])
    report = await verify(store, org, task_id, two_steps)
    assert report.outcome == "ok"
    assert "continue with step 'store'" in report.reason


async def test_code_that_finishes_before_the_journal_ends_diverges(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    task_id = await record(handler, org, STEPS, end="complete", end_value={"stored": 2})
    report = await verify(store, org, task_id, one_step)
    assert report.outcome == "divergence"
    assert "returned after 1 of the 2 recorded operations" in report.reason
    assert report.recorded["name"] == "store"
    assert report.code == {"returned": {"stored": 1}}


async def test_the_recorded_failure_raised_again_is_ok_a_new_one_is_not(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    same = await record(
        handler, org, STEPS[:1], end="fail", end_value={"type": "RuntimeError", "message": "nothing to store"}
    )
    assert (await verify(store, org, same, gives_up)).outcome == "ok"
    other = await record(handler, org, STEPS[:1], end="fail", end_value={"type": "KeyError", "message": "'x'"})
    report = await verify(store, org, other, gives_up)
    assert report.outcome == "divergence"
    assert report.code == {"type": "RuntimeError", "message": "nothing to store"}


async def test_a_task_pinned_to_a_version_no_longer_hosted(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    running = await record(handler, org, STEPS[:1])
    finished = await record(handler, org, STEPS, end="complete", end_value={"stored": 2})
    stranded = await verify(store, org, running, next_version)
    assert stranded.outcome == "divergence"
    assert "no longer hosts" in stranded.reason
    assert (await verify(store, org, finished, next_version)).outcome == "skipped"


async def test_a_replay_that_never_ends_is_stopped_and_flagged(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    task_id = await record(handler, org, STEPS[:1])
    stuck = await verify(store, org, task_id, waits_outside_its_context, limit=0.2)
    assert stuck.outcome == "divergence" and "did not finish within 0.2 s" in stuck.reason
    raised = await verify(store, org, task_id, times_out_by_itself, limit=5)
    assert raised.outcome == "divergence"
    assert raised.code == {"type": "TimeoutError", "message": "the upstream did not answer"}
