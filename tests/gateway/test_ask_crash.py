"""``ctx.ask`` across a crash, through the real stack and real runner processes: a runner that asked a
human is kill -9'd while the question waits, or right after the answer came while it runs the step
that follows; a new runner process finishes the workflow with the answer, asks nobody again and does
not repeat the step that ran before the question. The workflow, ``ask-then-act``, and the file its
side effects land in are in ``tests.gateway.crash_workflows``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.domain.ids import new_id
from tests.gateway.conftest import Stack
from tests.gateway.test_runner import until

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
STARTUP_SECONDS = 30.0
"""A runner process imports LiteLLM (through the crash workflows) before it claims anything."""


def start_runner(
    stack: Stack, tmp_path: Path, name: str, queue: str, sink: Path, *, hang: bool = False
) -> subprocess.Popen[bytes]:
    """A ``controlplane runner`` process hosting the crash workflows; with ``hang`` the step a task's
    payload names in ``hang_in`` never returns in it."""
    sink.touch()
    command = [str(Path(sys.executable).parent / "controlplane"), "runner", "--url", stack.url]
    command += ["--queue", queue, "--worker-id", f"{name}-{new_id()[-6:]}"]
    command += ["--workflows", "tests.gateway.crash_workflows:ALL", "--lease-seconds", "2"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "CP_CRASH_SINK": str(sink)}
    environment["CP_WORKER_KEY"] = stack.keys["acme"]["worker"]
    environment.pop("CP_CRASH_HANG", None)
    if hang:
        environment["CP_CRASH_HANG"] = "1"
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO, env=environment)


async def kill_9(runner: subprocess.Popen[bytes]) -> None:
    runner.kill()
    await asyncio.to_thread(runner.wait, 10)
    assert runner.returncode == -signal.SIGKILL, f"the runner had exited by itself ({runner.returncode})"


async def stop(runner: subprocess.Popen[bytes]) -> None:
    runner.terminate()  # drains: its last calls go to the gateway served by this very event loop
    await asyncio.to_thread(runner.wait, 15)


def side_effects(sink: Path) -> list[str]:
    """The lines the crash workflows' steps wrote: ``started <key>``, ``done <key>``."""
    return sink.read_text().splitlines()


def alive(runner: subprocess.Popen[bytes], tmp_path: Path, name: str) -> None:
    assert runner.poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]


async def submit_asking(admin: httpx.AsyncClient, queue: str, question: str, **payload: Any) -> str:
    body = {
        "type": "ask-then-act",
        "queue": queue,
        "workflow": {"name": "ask-then-act", "version": 1},
        "payload": {"question": question, **payload},
    }
    response = await admin.post("/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]  # type: ignore[no-any-return]


async def fetch(c: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    return (await c.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]


async def asked_by(
    runner: subprocess.Popen[bytes], tmp_path: Path, name: str, admin: httpx.AsyncClient, task_id: str
) -> dict[str, Any]:
    """The task's question, once the (living) runner has asked it."""

    async def question_pending() -> bool:
        alive(runner, tmp_path, name)
        task = await fetch(admin, task_id)
        return task["status"] == "awaiting_approval" and [a["status"] for a in task["approvals"]] == ["pending"]

    await until(question_pending, within=STARTUP_SECONDS)
    [question] = (await fetch(admin, task_id))["approvals"]
    return question  # type: ignore[no-any-return]


async def answer(approver: httpx.AsyncClient, question: dict[str, Any], text: str) -> None:
    response = await approver.post(f"/v1/approvals/{question['id']}/approve", json={"response": {"answer": text}})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "approved"


async def completed(admin: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    async def terminal() -> bool:
        return (await fetch(admin, task_id))["status"] in ("completed", "failed", "cancelled")

    await until(terminal, within=STARTUP_SECONDS)
    task = await fetch(admin, task_id)
    assert task["status"] == "completed", task["error"] or task["parked"]
    return task


async def assert_answered_once_and_nothing_repeated(
    stack: Stack, task: dict[str, Any], question: str, answer_text: str, sink: Path, *, act_interrupted: bool
) -> None:
    task_id = task["id"]
    prepare_key, act_key = f"{task_id}:0", f"{task_id}:2"
    assert task["result"] == {"answer": answer_text, "steps": [prepare_key, act_key]}

    journal = task["journal"]
    assert [e["index"] for e in journal] == list(range(len(journal))), "each position is recorded once"
    assert [(e["kind"], e["name"]) for e in journal] == [("step", "prepare"), ("approval", "approval"), ("step", "act")]
    assert [a["status"] for a in task["approvals"]] == ["approved"], "nobody was asked again"

    effects = Counter(side_effects(sink))
    assert effects[f"started {prepare_key}"] == 1, "the step before the question ran once, then was replayed"
    assert effects[f"done {prepare_key}"] == 1
    assert effects[f"started {act_key}"] == (2 if act_interrupted else 1), "only the interrupted step runs again"
    assert effects[f"done {act_key}"] == 1

    recorded = [r.event for r in await stack.services.handler.history("acme", "task", task_id)]
    requested = [e for e in recorded if type(e).__name__ == "ApprovalRequested"]
    assert len(requested) == 1, [type(e).__name__ for e in recorded]
    [asked] = requested
    assert (asked.kind, asked.journal_index, asked.details) == ("question", 1, {"question": question})
    assert [type(e).__name__ for e in recorded].count("ApprovalDecided") == 1
    assert [type(e).__name__ for e in recorded].count("TaskCompleted") == 1


async def test_a_runner_killed_while_its_question_waits_is_replaced_by_one_that_goes_on_with_the_answer(
    stack: Stack, tmp_path: Path
) -> None:
    queue, sink = f"wf{new_id()[-8:]}", tmp_path / "effects.log"
    question, answer_text = "Which environment should I roll out to?", "staging, behind the canary"
    async with stack.client() as admin, stack.client(role="approver") as approver:
        task_id = await submit_asking(admin, queue, question)
        doomed = start_runner(stack, tmp_path, "doomed", queue, sink)
        try:
            asked = await asked_by(doomed, tmp_path, "doomed", admin, task_id)
        finally:
            await kill_9(doomed)
        assert (asked["kind"], asked["details"]) == ("question", {"question": question})

        await answer(approver, asked, answer_text)  # no runner lives: the answer waits in the log
        heir = start_runner(stack, tmp_path, "heir", queue, sink)
        try:
            done = await completed(admin, task_id)
        finally:
            await stop(heir)
    await assert_answered_once_and_nothing_repeated(stack, done, question, answer_text, sink, act_interrupted=False)


async def test_a_runner_killed_in_the_step_after_the_answer_is_replaced_by_one_that_does_not_ask_again(
    stack: Stack, tmp_path: Path
) -> None:
    queue, sink = f"wf{new_id()[-8:]}", tmp_path / "effects.log"
    question, answer_text = "Which database should I migrate first?", "orders, then billing"
    async with stack.client() as admin, stack.client(role="approver") as approver:
        task_id = await submit_asking(admin, queue, question, hang_in="step")
        act_key = f"{task_id}:2"
        doomed = start_runner(stack, tmp_path, "doomed", queue, sink, hang=True)
        try:
            asked = await asked_by(doomed, tmp_path, "doomed", admin, task_id)
            await answer(approver, asked, answer_text)

            async def acting_on_the_answer() -> bool:
                alive(doomed, tmp_path, "doomed")
                return f"started {act_key}" in side_effects(sink)

            await until(acting_on_the_answer, within=STARTUP_SECONDS)
        finally:
            await kill_9(doomed)
        interrupted = await fetch(admin, task_id)
        assert interrupted["status"] in ("running", "pending"), "held by the killed runner, or its lease expired"
        assert [e["kind"] for e in interrupted["journal"]] == ["step", "approval"], "the step after it never ended"
        assert f"done {act_key}" not in side_effects(sink)

        heir = start_runner(stack, tmp_path, "heir", queue, sink)
        try:
            done = await completed(admin, task_id)
        finally:
            await stop(heir)
    await assert_answered_once_and_nothing_repeated(stack, done, question, answer_text, sink, act_interrupted=True)
