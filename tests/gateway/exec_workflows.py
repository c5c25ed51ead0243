"""Workflows for ``controlplane exec`` tests, loaded by the exec subprocess
(``--workflows tests.gateway.exec_workflows:ALL``)."""

from __future__ import annotations

from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow


def greeting_for(payload: dict[str, Any], *, idempotency_key: str) -> str:
    return f"hello {payload['name']}"


@workflow("exec-greet", version=1)
async def greet(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    """One step; its result is the task's."""
    return {"greeting": await ctx.step("greet", greeting_for, payload)}


class DeliberateFailure(Exception):
    pass


@workflow("exec-explode", version=1)
async def explode(ctx: WorkflowContext, payload: dict[str, Any]) -> None:
    """A step, then the workflow's own failure."""
    await ctx.step("greet", greeting_for, payload)
    raise DeliberateFailure(f"nothing to deploy for {payload['name']}")


@workflow("exec-gated", version=1)
async def gated(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    """A step, an LLM call (mocked by LiteLLM itself: no network) behind the tool policy, then a human's
    approval; the result says what the human decided."""
    planned = await ctx.step("plan", greeting_for, payload)
    summary = await ctx.llm(
        "summarise",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": planned}],
        mock_response=f"ship {payload['name']} to prod",
    )
    decision = await ctx.request_approval(f"ship {payload['name']}? {summary['content']}")
    return {"plan": planned, "decision": decision["status"]}


ALL = [greet, explode, gated]
