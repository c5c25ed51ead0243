"""The workflow the observability tests run in a runner subprocess: a step, an LLM call (LiteLLM's
mock: no network), a human approval and a second step."""

from __future__ import annotations

from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow


def plan(payload: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
    return {"env": payload.get("env", "staging"), "steps": ["build", "ship"]}


def ship(planned: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
    return {"shipped": planned["steps"]}


@workflow("traced-deploy", version=1)
async def traced_deploy(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    planned = await ctx.step("plan", plan, payload)
    summary = await ctx.llm(
        "summarise",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "summarise the plan"}],
        mock_response="build, then ship",
    )
    decision = await ctx.request_approval(f"deploy to {planned['env']}: {summary['content']}")
    if decision["status"] != "approved":
        return {"deployed": False}
    return {"deployed": True, **await ctx.step("ship", ship, planned)}


ALL = [traced_deploy]
