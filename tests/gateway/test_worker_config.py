"""Worker configuration over the real stack: an admin sets the org's and an environment's, a worker
registering gets its queue's environment's settings field by field over the org's (and the policy
bundle version), the Python client types it, and a runner applies it: its leases last as long as the
org says, and its workflows' model calls use the org's model, LLM gateway and fallbacks, with the
journal recording the call that was made. Each test seeds an org of its own."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from controlplane.client import AsyncClient
from core.domain.events import TaskClaimed
from core.domain.ids import new_id
from core.domain.subjects import aggregate_subject
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import appended_since, problem, queue
from tests.gateway.test_runner import running, until

pytestmark = pytest.mark.integration

UNSET_LLM = {"api_base": None, "model_override": None, "fallbacks": None}


def client(stack: Stack, key: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}", **headers}, timeout=20)


async def register(worker: httpx.AsyncClient, q: str) -> dict[str, Any]:
    r = await worker.post("/v1/workers", json={"worker_id": f"w{new_id()[-6:]}", "queue": q})
    assert r.status_code == 201, r.text
    config: dict[str, Any] = r.json()["config"]
    return config


async def test_a_registering_worker_gets_its_environments_settings_over_the_orgs(stack: Stack) -> None:
    _, keys = await new_org(stack)
    in_eu, outside = queue(), queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["worker"]) as worker:
        untouched = await register(worker, outside)
        assert untouched == {
            "environment": None,
            "heartbeat_interval_seconds": None,
            "lease_seconds": None,
            "llm": UNSET_LLM,
            "policy_bundle_version": None,
            "policy_bundle_digest": untouched["policy_bundle_digest"],
        }
        assert untouched["policy_bundle_digest"].startswith("sha256:")
        assert (await admin.put("/v1/environments/eu", json={"queues": [in_eu]})).status_code == 200
        org_wide = await admin.put(
            "/v1/worker-config",
            json={"lease_seconds": 45, "llm": {"api_base": "http://litellm:4000", "fallbacks": ["gpt-4o-mini"]}},
        )
        assert org_wide.status_code == 200, org_wide.text
        assert org_wide.json()["lease_seconds"] == 45 and org_wide.json()["seq"] > 0
        eu = await admin.put(
            "/v1/worker-config?environment=eu",
            json={"heartbeat_interval_seconds": 5, "llm": {"model_override": "gpt-4o"}},
        )
        assert eu.status_code == 200, eu.text
        assert eu.json()["environment"] == "eu" and eu.json()["lease_seconds"] is None, "the scope's own settings"
        effective = {
            "heartbeat_interval_seconds": 5,
            "lease_seconds": 45,
            "llm": {"api_base": "http://litellm:4000", "model_override": "gpt-4o", "fallbacks": ["gpt-4o-mini"]},
        }
        assert eu.json()["effective"] == effective

        got = await admin.get("/v1/worker-config", params={"environment": "eu"})
        assert got.json() == eu.json()
        assert (await admin.get("/v1/worker-config")).json() == org_wide.json() | {"seq": eu.json()["seq"]}

        assert await register(worker, in_eu) == {
            "environment": "eu",
            **effective,
            "policy_bundle_version": None,
            "policy_bundle_digest": untouched["policy_bundle_digest"],
        }
        outside_config = await register(worker, outside)
        assert (outside_config["lease_seconds"], outside_config["heartbeat_interval_seconds"]) == (45, None)
        assert outside_config["llm"]["model_override"] is None, "another environment's settings never apply"

        replaced = await admin.put("/v1/worker-config", json={"heartbeat_interval_seconds": 20})
        assert replaced.json()["lease_seconds"] is None and replaced.json()["llm"] == UNSET_LLM, "replaced whole"


async def test_only_admins_configure_workers_and_refusals_append_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin:
        seq = (await admin.put("/v1/worker-config", json={"lease_seconds": 30})).json()["seq"]
        for role in ("submitter", "worker", "approver", "viewer"):
            async with client(stack, keys[role]) as other:
                problem(await other.put("/v1/worker-config", json={"lease_seconds": 60}), 403)
                problem(await other.get("/v1/worker-config"), 403)
        unknown = problem(await admin.put("/v1/worker-config?environment=nowhere", json={}), 422)
        assert "environment nowhere is not defined" in unknown["detail"]
        problem(await admin.put("/v1/worker-config", json={"llm": {"api_base": "ftp://x"}}), 422)
        problem(await admin.put("/v1/worker-config", json={"lease_seconds": 0}), 422)
        problem(await admin.put("/v1/worker-config", json={"heartbeat_interval_seconds": 7200}), 422)
        problem(await admin.put("/v1/worker-config?environment=Not%20One", json={}), 422)
        assert await appended_since(stack, seq, org) == []

        first = await admin.put("/v1/worker-config", json={"lease_seconds": 60}, headers={"Idempotency-Key": "c1"})
        again = await admin.put("/v1/worker-config", json={"lease_seconds": 60}, headers={"Idempotency-Key": "c1"})
        assert first.json() == again.json() and await appended_since(stack, first.json()["seq"], org) == []


async def test_the_python_client_returns_the_config_with_the_worker(stack: Stack) -> None:
    _, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin:
        await admin.put("/v1/worker-config", json={"lease_seconds": 90, "llm": {"fallbacks": ["mistral"]}})
    async with AsyncClient(stack.url, api_key=keys["worker"]) as typed:
        worker = await typed.workers.register(f"w{new_id()[-6:]}", queue=queue())
    assert worker.config is not None
    assert (worker.config.lease_seconds, worker.config.llm.fallbacks) == (90, ["mistral"])
    assert worker.config.policy_bundle_version is None and worker.config.environment is None


@workflow("configured-llm", version=1)
async def configured_llm(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await ctx.llm(
        "ask", model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], mock_response="hello"
    )
    return {"content": answer["content"]}


async def test_a_runner_applies_the_orgs_lease_length_and_llm_settings_and_the_journal_records_the_call_made(
    stack: Stack,
) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        configured = await admin.put(
            "/v1/worker-config",
            json={
                "lease_seconds": 77,
                "llm": {"model_override": "gpt-4o-mini", "api_base": "http://127.0.0.1:9", "fallbacks": ["gpt-4o"]},
            },
        )
        assert configured.status_code == 200
        async with running(stack, Registry([configured_llm]), q, worker_key=keys["worker"]):
            task_id = (
                await admin.post(
                    "/v1/tasks",
                    json={"type": "llm", "queue": q, "workflow": {"name": "configured-llm", "version": 1}},
                )
            ).json()["id"]

            async def done() -> bool:
                return (await admin.get(f"/v1/tasks/{task_id}")).json()["status"] in ("completed", "failed")

            await until(done, within=30)
        task = (await admin.get(f"/v1/tasks/{task_id}")).json()
    assert task["status"] == "completed", task
    assert task["result"] == {"content": "hello"}
    [call] = [entry["result"] for entry in task["journal"] if entry["kind"] == "llm"]
    assert call["request"]["model"] == "gpt-4o-mini", "the org's model was called"
    assert call["request"]["workflow_model"] == "gpt-3.5-turbo", "and the journal says what the workflow asked"
    assert call["request"]["options"]["api_base"] == "http://127.0.0.1:9"
    assert call["request"]["options"]["fallbacks"] == ["gpt-4o"]
    history = await stack.services.store.read_subject(aggregate_subject(org, "task", task_id))
    [claim] = [r.event for r in history if isinstance(r.event, TaskClaimed)]
    assert claim.lease_seconds == 77, "the runner claims with the org's lease length"
