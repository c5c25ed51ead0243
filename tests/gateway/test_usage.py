"""``GET /v1/usage`` over the real stack: the LLM calls an org's tasks recorded, summed per UTC day and
model, filtered by queue and workflow, walled off from other orgs, and bad parameters answered 422.

Each test seeds an org of its own, so the LLM calls other tests of the session record never count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest

from application.policy import SPEND_CACHE_SECONDS
from controlplane.seed import seed_org
from core.domain.commands import Actor, RecordOperation
from core.domain.events import LlmCall, LlmUsage
from core.domain.ids import new_id
from core.log.handler import CommandHandler
from policies_wasm import default_bundle
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from tests.gateway.conftest import ROLES, Stack
from tests.gateway.test_runner import running, until

SHIPPED = default_bundle()

pytestmark = pytest.mark.integration


@pytest.fixture
async def org(stack: Stack) -> AsyncIterator[str]:
    """A fresh org with a key per role (``stack.client(org=…)`` finds them)."""
    name = f"u{new_id()[-10:]}"
    stack.keys[name] = await seed_org(stack.services.handler, name, ROLES)
    await stack.projector.run_until_caught_up()  # the keys are in the read model
    yield name
    del stack.keys[name]


def today(stack: Stack) -> date:
    return stack.services.clock().astimezone(UTC).date()


def llm_result(model: str, prompt: int, completion: int, cost: float | None) -> dict[str, Any]:
    """What ``ctx.llm`` records (runners/llm.py), as a worker posts it."""
    call = LlmCall(
        model=model,
        provider="test",
        content="ok",
        usage=LlmUsage(prompt_tokens=prompt, completion_tokens=completion),
        cost_usd=cost,
    )
    return msgspec.to_builtins(call)


class Task:
    """A task submitted and claimed over HTTP, whose worker posts LLM calls to its journal."""

    def __init__(self, org: str, worker: httpx.AsyncClient, task_id: str, lease_id: str) -> None:
        self.org, self.worker, self.id, self.lease_id = org, worker, task_id, lease_id
        self.next_index = 0

    @classmethod
    async def start(cls, stack: Stack, org: str, queue: str, workflow: str | None = None) -> Task:
        spec: dict[str, Any] = {"type": "chat", "queue": queue}
        if workflow is not None:
            spec["workflow"] = {"name": workflow, "version": 1}
        async with stack.client(org) as admin:
            submitted = await admin.post("/v1/tasks", json=spec)
        assert submitted.status_code == 201, submitted.text
        worker = stack.client(org, "worker")
        capabilities = [] if workflow is None else [f"workflow:{workflow}@v1"]
        claimed = await worker.post(
            "/v1/tasks/claim",
            json={"worker_id": "w1", "queue": queue, "capabilities": capabilities, "lease_seconds": 600},
        )
        assert claimed.status_code == 200, claimed.text
        return cls(org, worker, submitted.json()["id"], claimed.json()["lease"]["id"])

    async def llm(self, model: str, prompt: int, completion: int, cost: float | None = 0.0) -> int:
        r = await self.worker.post(
            f"/v1/tasks/{self.id}/operations",
            json={
                "worker_id": "w1",
                "lease_id": self.lease_id,
                "index": self.next_index,
                "kind": "llm",
                "name": f"ask-{self.next_index}",
                "result": llm_result(model, prompt, completion, cost),
            },
        )
        assert r.status_code == 201, r.text
        self.next_index += 1
        return int(r.json()["seq"])

    async def llm_on(self, stack: Stack, at: datetime, model: str, prompt: int, completion: int) -> int:
        """An LLM call recorded with a clock at ``at``: the usage counts it on that day. (The log is the
        only source; a gateway's clock cannot be set, so this one is appended by a handler of its own.)"""
        handler = CommandHandler(stack.services.store, clock=lambda: at)
        command = RecordOperation(
            task_id=self.id,
            worker_id="w1",
            lease_id=self.lease_id,
            index=self.next_index,
            kind="llm",
            name=f"ask-{self.next_index}",
            result=llm_result(model, prompt, completion, 0.0),
        )
        task, _ = await handler.load(self.org, "task", self.id)
        claimer = Actor(task.lease.holder, frozenset({"worker"}))  # the lease is the worker key's alone
        outcome = await handler.handle(self.org, command, actor=claimer)
        self.next_index += 1
        return outcome.seq

    async def close(self) -> None:
        await self.worker.aclose()


async def usage(client: httpx.AsyncClient, min_seq: int = 0, **params: str) -> list[dict[str, Any]]:
    r = await client.get("/v1/usage", params={"min_seq": str(min_seq), **params})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def rows(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(i["day"], i["model"], i["calls"], i["prompt_tokens"], i["completion_tokens"]) for i in items]


def queue() -> str:
    return f"q{new_id()[-10:]}"


async def test_llm_calls_show_up_summed_per_day_and_model(stack: Stack, org: str) -> None:
    day, q = today(stack), queue()
    task = await Task.start(stack, org, q)
    other = await Task.start(stack, org, queue())
    try:
        await task.llm("model-b", 10, 2, 0.0001)
        await task.llm("model-a", 5, 1, 0.00002)
        await task.llm("model-b", 30, 4, 0.0003)
        await other.llm("model-b", 100, 10, None)  # no cost reported: counts as 0
        two_days_ago = datetime.now(UTC) - timedelta(days=2)  # within the lease: the decider accepts it
        seq = await task.llm_on(stack, two_days_ago, "model-b", 7, 3)
        async with stack.client(org, "viewer") as viewer:
            items = await usage(viewer, seq, **{"from": str(day - timedelta(days=2)), "to": str(day)})
            assert items == [
                {
                    "day": str(two_days_ago.date()),
                    "model": "model-b",
                    "calls": 1,
                    "prompt_tokens": 7,
                    "completion_tokens": 3,
                    "cost_usd": 0.0,
                },
                {
                    "day": str(day),
                    "model": "model-a",
                    "calls": 1,
                    "prompt_tokens": 5,
                    "completion_tokens": 1,
                    "cost_usd": 0.00002,
                },
                {
                    "day": str(day),
                    "model": "model-b",
                    "calls": 3,
                    "prompt_tokens": 140,
                    "completion_tokens": 16,
                    "cost_usd": 0.0004,
                },
            ]
            # Without from and to: the 30 days up to today, said in the answer.
            r = await viewer.get("/v1/usage")
            assert (r.json()["from"], r.json()["to"]) == (str(day - timedelta(days=29)), str(day))
            assert rows(r.json()["items"]) == rows(items)
            # A range that leaves out the older day.
            assert rows(await usage(viewer, **{"from": str(day)})) == rows(items[1:])
            assert await usage(viewer, **{"to": str(day - timedelta(days=3))}) == []
    finally:
        await task.close()
        await other.close()


async def test_group_by_model_merges_the_days_and_group_by_day_the_models(stack: Stack, org: str) -> None:
    day = today(stack)
    task = await Task.start(stack, org, queue())
    try:
        await task.llm("model-x", 1, 1, 0.5)
        await task.llm("model-y", 2, 2, 0.25)
        seq = await task.llm_on(stack, datetime.now(UTC) - timedelta(days=1), "model-x", 4, 4)
        span = {"from": str(day - timedelta(days=1)), "to": str(day)}
        async with stack.client(org, "approver") as reader:
            by_model = await usage(reader, seq, group_by="model", **span)
            assert rows(by_model) == [(None, "model-x", 2, 5, 5), (None, "model-y", 1, 2, 2)]
            assert [item["cost_usd"] for item in by_model] == [0.5, 0.25]
            by_day = await usage(reader, seq, group_by="day", **span)
            assert rows(by_day) == [(str(day - timedelta(days=1)), None, 1, 4, 4), (str(day), None, 2, 3, 3)]
            assert rows(await usage(reader, seq, group_by="model,day", **span)) == rows(
                await usage(reader, seq, group_by="day,model", **span)
            )
    finally:
        await task.close()


async def test_queue_and_workflow_filters(stack: Stack, org: str) -> None:
    q1, q2 = queue(), queue()
    tasks = [
        await Task.start(stack, org, q1, workflow="summarise"),
        await Task.start(stack, org, q1),
        await Task.start(stack, org, q2, workflow="summarise"),
        await Task.start(stack, org, q2, workflow="classify"),
    ]
    try:
        seq = 0
        for n, task in enumerate(tasks, start=1):
            seq = await task.llm("model-q", n, 0)
        async with stack.client(org, "submitter") as reader:

            async def prompt_tokens(**params: str) -> list[int]:
                return [item["prompt_tokens"] for item in await usage(reader, seq, **params)]

            assert await prompt_tokens() == [1 + 2 + 3 + 4]
            assert await prompt_tokens(queue=q1) == [1 + 2]
            assert await prompt_tokens(queue=q2) == [3 + 4]
            assert await prompt_tokens(workflow="summarise") == [1 + 3]
            assert await prompt_tokens(workflow="classify") == [4]
            assert await prompt_tokens(queue=q1, workflow="summarise") == [1]
            assert await prompt_tokens(queue=q1, workflow="classify") == []
            assert await prompt_tokens(queue="no-such-queue") == []
    finally:
        for task in tasks:
            await task.close()


@workflow("usage-chat", version=1)
async def usage_chat(ctx: WorkflowContext, payload: Any) -> str:
    reply = await ctx.llm(
        "greet", model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], mock_response="hello there"
    )
    return str(reply["content"])


async def test_a_workflows_llm_calls_count_for_its_queue_and_workflow(stack: Stack, org: str) -> None:
    q = queue()
    async with (
        stack.client(org) as admin,
        running(stack, Registry([usage_chat]), q, worker_key=stack.keys[org]["worker"]),
    ):
        submitted = await admin.post(
            "/v1/tasks", json={"type": "chat", "queue": q, "workflow": {"name": "usage-chat", "version": 1}}
        )
        assert submitted.status_code == 201, submitted.text
        task_url = f"/v1/tasks/{submitted.json()['id']}"

        async def completed() -> bool:
            return (await admin.get(task_url)).json()["status"] == "completed"

        await until(completed)
        seq = (await admin.get(task_url)).json()["seq"]
        [item] = await usage(admin, seq, queue=q, workflow="usage-chat")
    assert (item["day"], item["model"], item["calls"]) == (str(today(stack)), "gpt-4o-mini", 1)
    assert item["completion_tokens"] > 0 and item["cost_usd"] >= 0


async def test_another_org_sees_none_of_it(stack: Stack, org: str) -> None:
    q = queue()
    task = await Task.start(stack, org, q)
    try:
        model = f"private-{new_id()[-8:]}"
        seq = await task.llm(model, 50, 5, 1.0)
        async with stack.client(org, "viewer") as mine, stack.client("globex", "admin") as theirs:
            assert [item["model"] for item in await usage(mine, seq, queue=q)] == [model]
            assert await usage(theirs, seq, queue=q) == []
            assert model not in [item["model"] for item in await usage(theirs, seq)]
    finally:
        await task.close()


async def test_every_role_may_read_it_and_a_credential_is_needed(stack: Stack, org: str) -> None:
    for role in ROLES:
        async with stack.client(org, role) as client:
            assert (await client.get("/v1/usage")).status_code == 200, role
    async with httpx.AsyncClient(base_url=stack.url) as anonymous:
        assert (await anonymous.get("/v1/usage")).status_code == 401


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"from": "yesterday"}, "from must be a date as YYYY-MM-DD"),
        ({"to": "2025-13-01"}, "to must be a date as YYYY-MM-DD"),
        ({"from": "2025-02-30"}, "from must be a date"),
        ({"from": "2025-1-1"}, "from must be a date"),
        ({"to": "20250101"}, "to must be a date"),
        ({"from": "2025-01-01T00:00:00"}, "from must be a date"),
        ({"from": "2025-02-01", "to": "2025-01-31"}, "from (2025-02-01) is after to (2025-01-31)"),
        ({"from": "2024-01-01", "to": "2025-01-01"}, "367 days; ask for at most 366"),
        ({"from": "2000-01-01"}, "ask for at most 366"),
        ({"group_by": "week"}, "unknown group_by 'week'"),
        ({"group_by": "day,,model"}, "unknown group_by ''"),
        ({"group_by": " "}, "unknown group_by ''"),
        ({"group_by": "day,queue"}, "unknown group_by 'queue'"),
        ({"queue": "Not A Token"}, "invalid queue 'Not A Token'"),
        ({"queue": "a" * 64}, "invalid queue"),
        ({"workflow": "x" * 64}, "invalid workflow"),
        ({"workflow": "a.b"}, "invalid workflow"),
        ({"min_seq": "soon"}, "min_seq must be a non-negative integer"),
    ],
)
async def test_bad_parameters_are_422_saying_what_to_send(stack: Stack, params: dict[str, str], detail: str) -> None:
    async with stack.client("globex", "viewer") as client:
        r = await client.get("/v1/usage", params=params)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert detail in r.json()["detail"]


async def test_edges_of_the_range_are_accepted(stack: Stack) -> None:
    async with stack.client("globex", "viewer") as client:
        for params in (
            {"from": "2024-01-01", "to": "2024-12-31"},  # 366 days, a leap year
            {"to": "0001-01-05"},  # the default 30 days would start before year 1
            {"from": "9999-12-31", "to": "9999-12-31"},
            {"from": "", "to": "", "group_by": "", "queue": "", "workflow": ""},  # a blank form field: none
        ):
            r = await client.get("/v1/usage", params=params)
            assert r.status_code == 200, (params, r.text)
            assert r.json()["items"] == []


async def test_a_spend_quota_counts_the_recorded_calls_not_a_submitters_estimate(stack: Stack, org: str) -> None:
    q = queue()
    shipped = SHIPPED.data["policy_config"]
    limited = {"policy_config": {**shipped, "orgs": {org: {"settings": {"max_cost_usd_per_day": 0.5}}}}}
    async with stack.client(org) as admin:
        pushed = await admin.post("/v1/policy-bundles", json={"modules": dict(SHIPPED.modules), "data": limited})
        assert pushed.status_code == 201, pushed.text
        cheap_estimate = {"type": "chat", "queue": q, "metadata": {"estimated_cost_usd": 0}}
        task = await Task.start(stack, org, q)
        try:
            seq = await task.llm("model-a", 1000, 100, 0.75)
        finally:
            await task.close()
        await stack.services.read_model.wait_for("usage", seq, timeout=10)
        await asyncio.sleep(SPEND_CACHE_SECONDS)  # the gateway's copy of today's spend is this old at most
        refused = await admin.post("/v1/tasks", json=cheap_estimate)
        assert refused.status_code == 403, refused.text
        assert "USD spent today (recorded LLM calls) reached the limit of 0.5" in refused.json()["detail"]
