"""Workflows for crash tests, loaded by runner subprocesses (``--workflows tests.gateway.crash_workflows:ALL``).

Everything that happens to the world is a line in the file named by ``CP_CRASH_SINK``: ``started <key>``
and ``done <key>`` for steps, ``llm <label>`` for each model call. In a process started with
``CP_CRASH_HANG=1`` the operation a task's payload names in ``hang_in`` never returns, so a test can
kill -9 the runner while it is inside a step or an LLM call. Importing this module instruments LiteLLM
for the runner process that loads it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import litellm

from runners.context import WorkflowContext
from runners.registry import workflow

HANG_SECONDS = 3600.0


def _sink() -> Path:
    return Path(os.environ["CP_CRASH_SINK"])


def _hangs(where: str, payload: dict[str, Any]) -> bool:
    return os.environ.get("CP_CRASH_HANG") == "1" and payload.get("hang_in") == where


def _append(line: str) -> None:
    with _sink().open("a") as out:
        out.write(line + "\n")


async def side_effect(payload: dict[str, Any], *, idempotency_key: str) -> str:
    await asyncio.to_thread(_append, f"started {idempotency_key}")
    if _hangs("step", payload):
        await asyncio.sleep(HANG_SECONDS)
    await asyncio.to_thread(_deliver_once, idempotency_key)
    return idempotency_key


def _deliver_once(idempotency_key: str) -> None:
    """What an idempotent receiver does: a repeat of a key it has applied changes nothing."""
    if f"done {idempotency_key}" not in _sink().read_text().splitlines():
        _append(f"done {idempotency_key}")


_real_completion = litellm.acompletion


async def _observed_completion(*args: Any, **kwargs: Any) -> Any:
    label = kwargs["messages"][-1]["content"]
    await asyncio.to_thread(_append, f"llm {label}")
    if os.environ.get("CP_CRASH_HANG") == "1" and label.endswith("hang-in-llm"):
        await asyncio.sleep(HANG_SECONDS)
    return await _real_completion(*args, **kwargs)


litellm.acompletion = _observed_completion


@workflow("all-operations", version=1)
async def all_operations(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    """One of each durable operation: step, LLM call, approval wait, sleep."""
    first = await ctx.step("first", side_effect, {})
    answer = await ctx.llm(
        "think",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": payload["label"]}],
        mock_response=f"plan for {payload['label']}",
    )
    slow = await ctx.step("slow", side_effect, payload)
    decision = await ctx.request_approval(f"go on with {payload['label']}?")
    await ctx.sleep(payload["sleep_seconds"])
    last = await ctx.step("last", side_effect, {})
    return {"steps": [first, slow, last], "answer": answer["content"], "decision": decision["status"]}


@workflow("ask-then-act", version=1)
async def ask_then_act(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    """A step, a question to a human (``ctx.ask``), and a step that uses the answer. With ``hang_in``
    ``step`` in its payload only the step after the question hangs (the first is given no payload)."""
    prepared = await ctx.step("prepare", side_effect, {})
    answer = await ctx.ask(payload["question"])
    acted = await ctx.step("act", side_effect, {**payload, "answer": answer})
    return {"answer": answer, "steps": [prepared, acted]}


ALL = [all_operations, ask_then_act]
