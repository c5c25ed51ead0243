"""The workflow ``bench/recovery.py`` runs: prepare, work, finish. Side effects are lines in the file
named by ``CP_RECOVERY_SINK``; in a runner started with ``CP_RECOVERY_HANG=1`` the ``work`` step never
returns, so every task is caught inside it when that runner is killed."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow


async def effect(name: str, *, idempotency_key: str) -> str:
    await asyncio.to_thread(_append, f"started {name} {idempotency_key} {time.time()}")
    if name == "work" and os.environ.get("CP_RECOVERY_HANG") == "1":
        await asyncio.sleep(3600)
    return idempotency_key


def _append(line: str) -> None:
    with Path(os.environ["CP_RECOVERY_SINK"]).open("a") as out:
        out.write(line + "\n")


@workflow("recovery", version=1)
async def recovery(ctx: WorkflowContext, payload: Any) -> list[str]:
    return [await ctx.step(name, effect, name) for name in ("prepare", "work", "finish")]


ALL = [recovery]
