"""Workflows for crash tests, loaded by a runner subprocess (``--workflows tests.gateway.crash_workflows:ALL``).
Side effects are lines in the file named by the payload: ``started <key>`` and ``done <key>``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow


async def slow_side_effect(sink: str, seconds: float, *, idempotency_key: str) -> str:
    await asyncio.to_thread(_append, Path(sink), f"started {idempotency_key}")
    await asyncio.sleep(seconds)
    await asyncio.to_thread(_deliver_once, Path(sink), idempotency_key)
    return idempotency_key


def _append(path: Path, line: str) -> None:
    with path.open("a") as out:
        out.write(line + "\n")


def _deliver_once(path: Path, idempotency_key: str) -> None:
    """What an idempotent receiver does: a repeat of a key it has applied changes nothing."""
    if f"done {idempotency_key}" not in path.read_text().splitlines():
        _append(path, f"done {idempotency_key}")


@workflow("crash-me", version=1)
async def crash_me(ctx: WorkflowContext, payload: dict[str, Any]) -> list[str]:
    first = await ctx.step("first", slow_side_effect, payload["sink"], 0.0)
    second = await ctx.step("slow", slow_side_effect, payload["sink"], payload["slow_seconds"])
    third = await ctx.step("third", slow_side_effect, payload["sink"], 0.0)
    return [first, second, third]


ALL = [crash_me]
