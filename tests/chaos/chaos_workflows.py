"""The workflow the chaos test runs in a runner subprocess (``tests.chaos.chaos_workflows:ALL``): a step,
a human approval, another step. Side effects are lines ``<idempotency key>`` in ``CP_CHAOS_SINK``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow


def _append(line: str) -> None:
    with Path(os.environ["CP_CHAOS_SINK"]).open("a") as out:
        out.write(line + "\n")


async def effect(*, idempotency_key: str) -> str:
    await asyncio.to_thread(_append, idempotency_key)
    return idempotency_key


@workflow("chaos", version=1)
async def chaos(ctx: WorkflowContext, payload: Any) -> dict[str, Any]:
    prepared = await ctx.step("prepare", effect)
    decision = await ctx.request_approval("apply the change?")
    applied = await ctx.step("apply", effect)
    return {"steps": [prepared, applied], "decision": decision["status"]}


ALL = [chaos]
