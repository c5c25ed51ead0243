"""Version 1 of the release workflow, changed without a version bump: after a human approves, it now
notifies before shipping. Runs recorded by ``release_v1`` that passed an approval no longer replay."""

from __future__ import annotations

from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow
from tests.tools.release_v1 import make_plan, runs, ship, summarise


def notify(service: str, *, idempotency_key: str) -> str:
    runs["notify"] += 1
    return f"notified the owners of {service}"


@workflow("tools-release", version=1)
async def release(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    plan = await ctx.step("plan", make_plan, payload["service"])
    summary = await summarise(ctx, plan)
    if payload.get("needs_approval"):
        decision = await ctx.request_approval(f"release {payload['service']}: {summary}")
        if decision["status"] != "approved":
            return {"released": False, "because": decision["status"]}
        await ctx.step("notify", notify, payload["service"])
    shipped = await ctx.step("ship", ship, plan)
    return {"released": True, "summary": summary, **shipped}


ALL = [release]
