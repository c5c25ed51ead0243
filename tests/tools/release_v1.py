"""Version 1 of the release workflow whose recorded runs ``controlplane verify`` checks
(``--workflows tests.tools.release_v1:ALL``). Steps count their real runs in ``runs``, so a test can
prove that verification answered them from the journal instead of running them."""

from __future__ import annotations

from collections import Counter
from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow

runs: Counter[str] = Counter()


def make_plan(service: str, *, idempotency_key: str) -> list[str]:
    runs["plan"] += 1
    return [f"build {service}", f"deploy {service}"]


def ship(plan: list[str], *, idempotency_key: str) -> dict[str, Any]:
    runs["ship"] += 1
    return {"shipped": plan}


async def summarise(ctx: WorkflowContext, plan: list[str]) -> str:
    answer = await ctx.llm(
        "summarise", model="gpt-4o-mini", messages=[{"role": "user", "content": str(plan)}], mock_response="ship it"
    )
    return str(answer["content"])


@workflow("tools-release", version=1)
async def release(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    plan = await ctx.step("plan", make_plan, payload["service"])
    summary = await summarise(ctx, plan)
    if payload.get("needs_approval"):
        decision = await ctx.request_approval(f"release {payload['service']}: {summary}")
        if decision["status"] != "approved":
            return {"released": False, "because": decision["status"]}
    shipped = await ctx.step("ship", ship, plan)
    return {"released": True, "summary": summary, **shipped}


ALL = [release]
