"""``ctx.ask``: a workflow asks a human through the approvals inbox, labelled as a question, and gets the
answer back; a declined or unanswered question raises. And the ``agent-chat`` example, a multi-turn
conversation between a model and a human, end to end through the real stack and a runner restart."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.domain.ids import new_id
from runners.context import QUESTION_FORM, QuestionDeclined, WorkflowContext
from runners.examples import EXAMPLES, QUESTION_MARKER
from runners.registry import Registry, workflow
from tests.gateway.conftest import Stack
from tests.gateway.test_console_http import sign_in
from tests.gateway.test_runner import running, until

pytestmark = pytest.mark.integration

SHIP_FORM = {
    "type": "object",
    "properties": {"environment": {"type": "string", "enum": ["staging", "prod"]}, "percent": {"type": "integer"}},
    "required": ["environment"],
}


@workflow("asker", version=1)
async def asker(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await ctx.ask("Which environment should I use?", timeout_seconds=payload.get("timeout_seconds"))
    structured = await ctx.ask("How far do we roll out?", form=SHIP_FORM) if payload.get("structured") else None
    return {"answer": answer, "structured": structured}


async def state(c: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    return (await c.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]


async def pending_question(c: httpx.AsyncClient, task_id: str, number: int) -> dict[str, Any]:
    """The task's ``number``-th approval, once it is pending."""

    async def asked() -> bool:
        approvals = (await state(c, task_id))["approvals"]
        return len(approvals) >= number and approvals[number - 1]["status"] == "pending"

    await until(asked)
    return (await state(c, task_id))["approvals"][number - 1]  # type: ignore[no-any-return]


async def finished(c: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    async def terminal() -> bool:
        return (await state(c, task_id))["status"] in ("completed", "failed")

    await until(terminal)
    return await state(c, task_id)


def submit_body(q: str, name: str, **payload: Any) -> dict[str, Any]:
    return {"type": name, "queue": q, "workflow": {"name": name, "version": 1}, "payload": payload}


async def test_ask_shows_a_question_in_the_inbox_and_returns_the_answer(stack: Stack) -> None:
    q = f"wf{new_id()[-8:]}"
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        running(stack, Registry([asker]), q),
    ):
        task = (await admin.post("/v1/tasks", json=submit_body(q, "asker", structured=True))).json()
        question = await pending_question(admin, task["id"], 1)
        assert question["kind"] == "question"
        assert question["details"] == {"question": "Which environment should I use?"}
        assert question["reason"] == "Which environment should I use?"
        assert question["form"] == QUESTION_FORM
        async with sign_in(stack, stack.keys["acme"]["approver"]) as http:
            row = await http.get(f"/console/approvals/{question['id']}/row")
            assert row.status_code == 200
            assert 'data-testid="approval-kind">Question<' in row.text
            assert 'data-kind="question"' in row.text
            assert 'name="response.answer"' in row.text, "the answer field of the default form is shown"
            assert 'data-testid="approval-details"' in row.text and 'data-testid="approve"' in row.text
        unanswered = await approver.post(f"/v1/approvals/{question['id']}/approve", json={})
        assert unanswered.status_code == 422, "the default form asks for an answer"
        answered = await approver.post(
            f"/v1/approvals/{question['id']}/approve", json={"response": {"answer": "staging"}}
        )
        assert answered.status_code == 200, answered.text
        second = await pending_question(admin, task["id"], 2)
        assert second["form"] == SHIP_FORM
        await approver.post(
            f"/v1/approvals/{second['id']}/approve", json={"response": {"environment": "prod", "percent": 10}}
        )
        done = await finished(admin, task["id"])
    assert done["status"] == "completed", done["error"]
    assert done["result"] == {"answer": "staging", "structured": {"environment": "prod", "percent": 10}}


async def test_a_declined_or_unanswered_question_raises_and_fails_the_task_once(stack: Stack) -> None:
    q = f"wf{new_id()[-8:]}"
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        running(stack, Registry([asker]), q),
    ):
        declined = (await admin.post("/v1/tasks", json=submit_body(q, "asker"))).json()
        question = await pending_question(admin, declined["id"], 1)
        await approver.post(f"/v1/approvals/{question['id']}/reject", json={"reason": "not my call"})
        unanswered = (await admin.post("/v1/tasks", json=submit_body(q, "asker", timeout_seconds=0.5))).json()
        failed = [await finished(admin, declined["id"]), await finished(admin, unanswered["id"])]
    for task, status in zip(failed, ("rejected", "timed_out"), strict=True):
        assert task["status"] == "failed", "a declined question is not retried"
        assert task["retries"] == 0
        assert task["error"]["type"] == QuestionDeclined.__name__
        assert f"was {status}" in task["error"]["message"]
    assert failed[0]["error"]["reasons"] == ["not my call"]


async def test_the_agent_chat_example_asks_answers_and_ends_when_the_human_is_done(stack: Stack) -> None:
    """Offline the model is LiteLLM's mock: its first reply is a clarifying question, later ones answer.
    The runner is replaced between turns: the conversation goes on from its journal."""
    q = f"wf{new_id()[-8:]}"
    body = {"type": "agent-chat", "queue": q, "workflow": {"name": "agent-chat"}, "payload": {"request": "ship it"}}
    async with stack.client() as admin, stack.client(role="approver") as approver:
        task = (await admin.post("/v1/tasks", json=body)).json()
        async with running(stack, Registry(EXAMPLES), q):
            clarify = await pending_question(admin, task["id"], 1)
        assert clarify["kind"] == "question"
        assert clarify["details"]["question"] == "Which service and which environment do you mean by 'ship it'?"
        answered = await approver.post(
            f"/v1/approvals/{clarify['id']}/approve", json={"response": {"answer": "the web service, to staging"}}
        )
        assert answered.status_code == 200, answered.text
        async with running(stack, Registry(EXAMPLES), q):
            follow_up = await pending_question(admin, task["id"], 2)
            assert follow_up["details"]["question"].startswith("Understood (the web service, to staging).")
            await approver.post(f"/v1/approvals/{follow_up['id']}/approve", json={"response": {"done": True}})
            done = await finished(admin, task["id"])
    assert done["status"] == "completed", done["error"]
    conversation = done["result"]["conversation"]
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[0]["content"] == "ship it"
    assert conversation[1]["content"].startswith(QUESTION_MARKER)
    assert conversation[2]["content"] == "the web service, to staging"
    assert done["result"]["ended"] == "done"
    llm_calls = [e["result"] for e in done["journal"] if e["kind"] == "llm"]
    assert [len(call["request"]["messages"]) for call in llm_calls] == [2, 4], "each turn sends the whole history"
    assert [e["kind"] for e in done["journal"]].count("approval") == 2
