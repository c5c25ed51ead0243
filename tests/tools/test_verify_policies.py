"""``verify`` and policy decisions: a recorded decision answers only the input it was made for, and the
bundle that made it is asked again, so an engine that decides otherwise today is caught before a
deploy. Histories are recorded through the real command handler and NATS."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from controlplane.task_log import runner_view, task_history
from core.domain.commands import Actor, ClaimTask, CompleteTask, RecordOperation, SubmitTask
from core.domain.events import WorkflowRef
from core.domain.history import state_at
from core.domain.ids import new_id
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from policies_wasm import Bundle
from policies_wasm.engine import SOURCES_DIR
from runners.context import WorkflowContext
from runners.policies import Policies
from runners.registry import Registry, workflow
from runners.verify import SameBundles, verify_task

pytestmark = pytest.mark.integration

WORKER = Actor("w1", frozenset({"worker"}))
SHIPPED = Bundle.from_dir(SOURCES_DIR)
TOOL = "controlplane/tool"


def asked_tool(tool: str) -> Any:
    @workflow("policy-case", version=1)
    async def case(ctx: WorkflowContext, payload: Any) -> Any:
        return (await ctx.policy(TOOL, {"tool": tool}))["allow"]

    return case


async def recorded(handler: CommandHandler, org: str, decision: dict[str, Any], result: Any) -> str:
    """A completed task of ``policy-case`` whose one operation is ``decision``."""
    task_id = new_id()
    await handler.handle(
        org,
        SubmitTask(task_id=task_id, task_type="case", workflow=WorkflowRef("policy-case", 1)),
        actor=Actor("alice", frozenset({"submitter"})),
    )
    lease = {"worker_id": "w1", "lease_id": f"l{new_id()[-6:]}"}
    await handler.handle(
        org, ClaimTask(task_id=task_id, **lease, capabilities=("workflow:policy-case@v1",)), actor=WORKER
    )
    await handler.handle(
        org, RecordOperation(task_id=task_id, **lease, index=0, kind="policy", name=TOOL, result=decision), actor=WORKER
    )
    await handler.handle(org, CompleteTask(task_id=task_id, **lease, result=result), actor=WORKER)
    return task_id


async def decision_for(org: str, tool: str) -> dict[str, Any]:
    """What the shipped bundle decides for the tool, as a runner records it."""
    scope = {"org": org, "queue": "default", "task_type": "case", "workflow": "policy-case"}
    made = await Policies(SHIPPED).evaluate(TOOL, {**scope, "tool": tool}, org=org, pinned=None, api=None)  # type: ignore[arg-type]
    return msgspec.to_builtins(made)  # type: ignore[no-any-return]


async def verify(store: JetStreamEventStore, org: str, task_id: str, code: Any, bundles: SameBundles) -> Any:
    state, seq = state_at(await task_history(store, org, task_id))
    assert state is not None
    return await verify_task(runner_view(state, seq), Registry([code]), bundles=bundles)


async def test_an_unchanged_decision_of_a_known_bundle_passes(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    decision = await decision_for(org, "curl")
    task_id = await recorded(handler, org, decision, decision["value"]["allow"])
    report = await verify(store, org, task_id, asked_tool("curl"), SameBundles([SHIPPED]))
    assert report.outcome == "ok", report
    assert "1 of 1 policy decision(s) decided again by their own bundle, unchanged" in report.reason
    unknown = await verify(store, org, task_id, asked_tool("curl"), SameBundles([]))
    assert unknown.outcome == "ok" and "(1 name a bundle not known here)" in unknown.reason


async def test_asking_a_policy_with_another_input_diverges(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    decision = await decision_for(org, "curl")
    task_id = await recorded(handler, org, decision, decision["value"]["allow"])
    report = await verify(store, org, task_id, asked_tool("rm-rf"), SameBundles([SHIPPED]))
    assert report.outcome == "divergence", report
    assert report.recorded == {"kind": "policy", "name": TOOL, "input_digest": decision["input_digest"]}
    assert report.code["input_digest"] != decision["input_digest"]


async def test_a_bundle_that_decides_otherwise_today_diverges(
    handler: CommandHandler, store: JetStreamEventStore, org: str
) -> None:
    decision = await decision_for(org, "curl")
    assert decision["value"]["allow"] is True
    # As an older engine would have recorded it: the same bundle and input, another answer.
    other = {**decision, "value": {**decision["value"], "allow": False, "reasons": ["tool curl is not allowed"]}}
    task_id = await recorded(handler, org, other, False)
    report = await verify(store, org, task_id, asked_tool("curl"), SameBundles([SHIPPED]))
    assert report.outcome == "divergence", report
    assert "no longer gives the recorded answer" in report.reason
    assert (report.recorded["allow"], report.code["allow"]) == (False, True)
