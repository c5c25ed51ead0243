"""Approvals carry what is being approved (``details``), may ask for a structured answer (``form``), and
keep each decision's ``response``: through real HTTP, the read model, the decision function the
console shares, and a durable workflow."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from application.approvals import decide
from application.forms import MAX_DETAILS_BYTES
from application.principal import Principal
from core.domain.commands import Actor
from core.domain.errors import Rejected
from core.domain.ids import new_id
from gateway.problems import describe
from runners.context import WorkflowContext
from runners.examples import EXAMPLES
from runners.registry import Registry, workflow
from tests.gateway.conftest import Stack
from tests.gateway.test_api import appended_since, claim, last_seq, problem, queue, submit
from tests.gateway.test_runner import running, until

pytestmark = pytest.mark.integration

ROLLOUT = {
    "type": "object",
    "properties": {"rollout_percent": {"type": "integer", "minimum": 1, "maximum": 100}, "note": {"type": "string"}},
    "required": ["rollout_percent"],
    "additionalProperties": False,
}
DETAILS = {
    "plan": "- build the image\n- roll out to 10%, then 100%",
    "tool_call": {"name": "deploy", "arguments": {"service": "web", "replicas": 3, "canary": 0.1}},
    "diff": ["-image: web:1.4", "+image: web:1.5"],
    "huge": 2**70,
    "unicode": "déploiement ✓",
}


async def ask(
    c: httpx.AsyncClient, by: httpx.AsyncClient | None = None, **fields: Any
) -> tuple[dict[str, Any], httpx.Response]:
    """A task on a queue of its own, claimed (``by`` another client, if given), and the response to an
    approval request with ``fields``."""
    q, worker = queue(), by or c
    task = await submit(c, q)
    leased = await claim(worker, q)
    assert leased is not None
    body = {"worker_id": "w1", "lease_id": leased["lease"]["id"], "reason": "ship web 1.5?", **fields}
    return task, await worker.post(f"/v1/tasks/{task['id']}/approval-requests", json=body)


async def asked(c: httpx.AsyncClient, by: httpx.AsyncClient | None = None, **fields: Any) -> dict[str, Any]:
    _, r = await ask(c, by, **fields)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_details_and_form_round_trip_through_the_api_and_the_read_model(stack: Stack) -> None:
    async with stack.client() as admin:
        task, r = await ask(admin, details=DETAILS, form=ROLLOUT)
        assert r.status_code == 201, r.text
        approval = r.json()
        assert (approval["details"], approval["form"], approval["decisions"]) == (DETAILS, ROLLOUT, [])
        got = (await admin.get(f"/v1/approvals/{approval['id']}")).json()
        assert (got["details"], got["form"]) == (DETAILS, ROLLOUT)
        inbox = await admin.get("/v1/approvals", params={"task_id": task["id"], "min_seq": approval["seq"]})
        [listed] = inbox.json()["items"]
        assert (listed["details"], listed["form"]) == (DETAILS, ROLLOUT)
        [row] = (await admin.get("/v1/tasks", params={"queue": task["queue"], "min_seq": approval["seq"]})).json()[
            "items"
        ]
        assert (row["approvals"][0]["details"], row["approvals"][0]["form"]) == (DETAILS, ROLLOUT)
        shown = (await admin.get(f"/v1/tasks/{task['id']}")).json()["approvals"][0]
        assert (shown["details"], shown["form"]) == (DETAILS, ROLLOUT)
        plain = await asked(admin)
        assert (plain["details"], plain["form"]) == (None, None)


async def test_a_response_that_does_not_fit_the_form_is_refused_and_appends_nothing(stack: Stack) -> None:
    async with stack.client() as admin, stack.client(role="approver") as approver:
        approval = await asked(admin, details=DETAILS, form=ROLLOUT)
        decide_url = f"/v1/approvals/{approval['id']}"
        before = await last_seq(stack)
        refused = problem(
            await approver.post(f"{decide_url}/approve", json={"response": {"rollout_percent": 500}}), 422
        )
        assert "500 is greater than the maximum of 100" in refused["detail"]
        extra = {"response": {"rollout_percent": 5, "force": True}}
        assert (
            "'force' was unexpected" in problem(await approver.post(f"{decide_url}/approve", json=extra), 422)["detail"]
        )
        assert "asks for a response" in problem(await approver.post(f"{decide_url}/approve"), 422)["detail"]
        wrong_type = {"reason": "no", "response": {"rollout_percent": "ten"}}
        assert (
            "is not of type 'integer'"
            in problem(await approver.post(f"{decide_url}/reject", json=wrong_type), 422)["detail"]
        )
        assert await appended_since(stack, before) == [], "nothing was appended"
        assert (await admin.get(decide_url)).json()["decisions"] == []

        answer = {"rollout_percent": 10, "note": "canary first"}
        r = await approver.post(f"{decide_url}/approve", json={"comment": "go slow", "response": answer})
        assert r.status_code == 200, r.text
        decided = r.json()
        assert decided["status"] == "approved"
        [vote] = decided["decisions"]
        assert (vote["decision"], vote["comment"], vote["response"]) == ("approve", "go slow", answer)
        assert set(vote) == {"by", "decision", "comment", "response", "at"}
        assert (await admin.get(decide_url)).json()["decisions"] == decided["decisions"]
        inbox = await admin.get("/v1/approvals", params={"task_id": approval["task_id"], "min_seq": decided["seq"]})
        assert inbox.json()["items"][0]["decisions"][0]["response"] == answer


async def test_a_rejection_may_leave_the_form_blank_and_without_a_form_any_answer_is_kept(stack: Stack) -> None:
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        stack.client(role="worker") as worker,
    ):
        formed = await asked(admin, form=ROLLOUT)
        r = await approver.post(f"/v1/approvals/{formed['id']}/reject", json={"reason": "not this week"})
        assert r.status_code == 200, r.text
        assert [(v["decision"], v["response"]) for v in r.json()["decisions"]] == [("reject", None)]

        free = await asked(admin, worker, quorum=2)
        answer = [1, 2.5, {"why": "looks fine"}, None]
        first = await approver.post(f"/v1/approvals/{free['id']}/approve", json={"response": answer})
        second = await admin.post(f"/v1/approvals/{free['id']}/approve", json={"response": "ok"})
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert [v["response"] for v in second.json()["decisions"]] == [answer, "ok"]
        big = {"response": "x" * (64 * 1024)}
        later = await asked(admin)
        assert (
            "the limit is"
            in problem(await approver.post(f"/v1/approvals/{later['id']}/approve", json=big), 422)["detail"]
        )


async def test_an_invalid_form_or_oversized_details_are_refused_and_append_nothing(stack: Stack) -> None:
    q = queue()
    async with stack.client() as admin:
        task = await submit(admin, q)
        leased = await claim(admin, q)
        assert leased is not None
        lease = {"worker_id": "w1", "lease_id": leased["lease"]["id"], "reason": "ship?"}
        url = f"/v1/tasks/{task['id']}/approval-requests"
        before = await last_seq(stack)
        not_a_schema = problem(await admin.post(url, json={**lease, "form": {"type": "nope"}}), 422)
        assert "not a valid JSON Schema" in not_a_schema["detail"]
        problem(await admin.post(url, json={**lease, "form": {"required": "rollout_percent"}}), 422)
        problem(await admin.post(url, json={**lease, "form": ["not", "an", "object"]}), 422)
        remote = problem(await admin.post(url, json={**lease, "form": {"$ref": "http://169.254.169.254/latest"}}), 422)
        assert "only point inside it" in remote["detail"]
        oversized = problem(await admin.post(url, json={**lease, "details": {"diff": "x" * MAX_DETAILS_BYTES}}), 422)
        assert f"the limit is {MAX_DETAILS_BYTES}" in oversized["detail"]
        assert await appended_since(stack, before) == [], "nothing was appended"
        assert (await admin.get(f"/v1/tasks/{task['id']}")).json()["status"] == "running", "the lease is still held"
        r = await admin.post(url, json={**lease, "details": {"diff": "small"}, "form": ROLLOUT})
        assert r.status_code == 201, r.text


async def test_a_retried_decision_with_the_same_key_is_recorded_once(stack: Stack) -> None:
    async with stack.client() as admin, stack.client(role="approver", **{"Idempotency-Key": new_id()}) as approver:
        approval = await asked(admin, form=ROLLOUT)
        body = {"response": {"rollout_percent": 50}}
        first = await approver.post(f"/v1/approvals/{approval['id']}/approve", json=body)
        again = await approver.post(f"/v1/approvals/{approval['id']}/approve", json=body)
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json()["seq"] == again.json()["seq"]
        assert len(again.json()["decisions"]) == 1


async def test_the_routes_and_the_console_decide_through_one_function(stack: Stack) -> None:
    who = Principal("acme", Actor("console:ann", frozenset({"approver"})), "console:ann")
    async with stack.client() as admin:
        approval = await asked(admin, details={"change": "rotate keys"}, form=ROLLOUT)
        before = await last_seq(stack)
        handler = stack.services.handler
        with pytest.raises(Rejected) as refused:
            await decide(handler, who, approval["id"], "approve", comment=None, response={"x": 1}, command_id=None)
        status, detail, _ = describe(refused.value) or (None, "", {})
        assert status == 422
        assert "'rollout_percent' is a required property" in detail
        with pytest.raises(Rejected) as missing:
            await decide(handler, who, "nope-1", "approve", comment=None, response=None, command_id=None)
        assert (describe(missing.value) or (None,))[0] == 404
        assert await appended_since(stack, before) == []
        decided, seq = await decide(
            handler,
            who,
            approval["id"],
            "approve",
            comment="from the console",
            response={"rollout_percent": 25},
            command_id=None,
        )
        assert (decided.status, seq) == ("approved", (await appended_since(stack, before))[-1].seq)
        assert [(v.by, v.response) for v in decided.decisions] == [("console:ann", {"rollout_percent": 25})]
        shown = (await admin.get(f"/v1/approvals/{approval['id']}")).json()
        assert shown["decisions"][0]["response"] == {"rollout_percent": 25}
        assert shown["decisions"][0]["comment"] == "from the console"


# --- workflows ---------------------------------------------------------------------------------------


@workflow("rollout-with-answers", version=1)
async def rollout_with_answers(ctx: WorkflowContext, payload: Any) -> dict[str, Any]:
    decision = await ctx.request_approval(
        "roll out web 1.5?", quorum=2, details={"service": "web", "version": "1.5"}, form=ROLLOUT
    )
    return {"status": decision["status"], "responses": [d["response"] for d in decision["decisions"]]}


async def test_a_workflow_gets_every_decisions_response(stack: Stack) -> None:
    queue_name = f"wf{new_id()[-8:]}"
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        running(stack, Registry([rollout_with_answers]), queue_name),
    ):
        body = {"type": "rollout", "queue": queue_name, "workflow": {"name": "rollout-with-answers", "version": 1}}
        task_id = (await admin.post("/v1/tasks", json=body)).json()["id"]
        await until(status_is(admin, task_id, "awaiting_approval"))
        [approval] = (await admin.get(f"/v1/tasks/{task_id}")).json()["approvals"]
        assert (approval["details"], approval["form"]) == ({"service": "web", "version": "1.5"}, ROLLOUT)
        url = f"/v1/approvals/{approval['id']}/approve"
        assert (await approver.post(url, json={"response": {"rollout_percent": 10}})).status_code == 200
        assert (await admin.post(url, json={"response": {"rollout_percent": 100, "note": "all"}})).status_code == 200
        await until(status_is(admin, task_id, "completed"))
        done = (await admin.get(f"/v1/tasks/{task_id}")).json()
    assert done["result"] == {
        "status": "approved",
        "responses": [{"rollout_percent": 10}, {"rollout_percent": 100, "note": "all"}],
    }


async def test_a_replay_asking_approval_for_other_details_is_parked_not_answered(stack: Stack) -> None:
    """The humans approved the details they were shown: code that now asks about other details must
    not take their decision for its own."""

    @workflow("shown-plan", version=1)
    async def before(ctx: WorkflowContext, payload: Any) -> str:
        await ctx.request_approval("run the plan?", details={"plan": "restart web"})
        return "ran"

    @workflow("shown-plan", version=1)
    async def after(ctx: WorkflowContext, payload: Any) -> str:
        await ctx.request_approval("run the plan?", details={"plan": "drop the database"})
        return "ran"

    queue_name = f"wf{new_id()[-8:]}"
    async with stack.client() as admin, stack.client(role="approver") as approver:
        body = {"type": "plan", "queue": queue_name, "workflow": {"name": "shown-plan", "version": 1}}
        task_id = (await admin.post("/v1/tasks", json=body)).json()["id"]
        async with running(stack, Registry([before]), queue_name):
            await until(status_is(admin, task_id, "awaiting_approval"))
        [approval] = (await admin.get(f"/v1/tasks/{task_id}")).json()["approvals"]
        await approver.post(f"/v1/approvals/{approval['id']}/approve")

        async def parked() -> bool:
            return (await admin.get(f"/v1/tasks/{task_id}")).json()["parked"] is not None

        async with running(stack, Registry([after]), queue_name):
            await until(parked)
        stuck = (await admin.get(f"/v1/tasks/{task_id}")).json()
    assert "non-deterministic at operation 0" in stuck["parked"]
    assert stuck["result"] is None


async def test_the_agent_deploy_example_shows_the_human_the_plan_it_will_run(stack: Stack) -> None:
    queue_name = f"wf{new_id()[-8:]}"
    async with (
        stack.client() as admin,
        stack.client(role="approver") as approver,
        running(stack, Registry(EXAMPLES), queue_name),
    ):
        body = {
            "type": "agent-deploy",
            "queue": queue_name,
            "workflow": {"name": "agent-deploy"},
            "payload": {"goal": "ship the api", "environment": "prod"},
        }
        task_id = (await admin.post("/v1/tasks", json=body)).json()["id"]
        await until(status_is(admin, task_id, "awaiting_approval"))
        waiting = (await admin.get(f"/v1/tasks/{task_id}")).json()
        [approval] = waiting["approvals"]
        plan = next(e["result"]["content"] for e in waiting["journal"] if e["name"] == "plan")
        details = approval["details"]
        assert {k: details[k] for k in ("goal", "environment", "plan", "tools")} == {
            "goal": "ship the api",
            "environment": "prod",
            "plan": plan,
            "tools": ["deploy"],
        }
        assert details["policy_reasons"], "why a human must agree"
        await approver.post(f"/v1/approvals/{approval['id']}/approve", json={"comment": "go"})
        await until(status_is(admin, task_id, "completed"))
        done = (await admin.get(f"/v1/tasks/{task_id}")).json()
    assert done["result"]["executed"] is True
    assert done["result"]["steps"] == [line.strip("- ").strip() for line in plan.splitlines() if line.strip()]


def status_is(c: httpx.AsyncClient, task_id: str, status: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await c.get(f"/v1/tasks/{task_id}")).json()["status"] == status  # type: ignore[no-any-return]

    return check
