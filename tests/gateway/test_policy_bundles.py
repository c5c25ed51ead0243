"""Policy bundles are versioned data on the log: an org's admin pushes a version, it decides every later
submission, and a task keeps the version it was submitted under, also for the policies its workflow
asks long after newer versions were pushed. Each test seeds an org of its own, so the other tests keep
the shipped policies."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from policies_wasm import Bundle
from policies_wasm.engine import SOURCES_DIR
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import appended_since, last_seq, problem, queue, submit
from tests.gateway.test_runner import running, until

pytestmark = pytest.mark.integration

SHIPPED = Bundle.from_dir(SOURCES_DIR)


def client(stack: Stack, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=20)


def denying(org: str, tools: list[str]) -> dict[str, Any]:
    """The shipped data, with ``org`` denying ``tools``."""
    config = SHIPPED.data["policy_config"]
    return {"policy_config": {**config, "orgs": {org: {"settings": {"denied_tools": tools}}}}}


def bundle_body(data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"modules": dict(SHIPPED.modules), "data": data, **fields}


async def test_a_pushed_version_decides_later_submissions_and_earlier_tasks_keep_theirs(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["viewer"]) as viewer:
        assert (await viewer.get("/v1/policy-bundles")).json()["items"] == []
        risky = {"type": "fetch", "queue": q, "metadata": {"tools": ["curl"]}}
        before = await submit(admin, q, metadata={"tools": ["curl"]})
        assert before["policy"] == {"version": None, "digest": SHIPPED.digest}

        pushed = await admin.post("/v1/policy-bundles", json=bundle_body(denying(org, ["curl"]), revision="r1"))
        assert pushed.status_code == 201, pushed.text
        v1 = pushed.json()
        assert (v1["version"], v1["revision"], v1["unchanged"]) == (1, "r1", False)
        assert v1["engine"] in ("regopy", "opa-wasm")
        assert "controlplane/submit" in v1["entrypoints"]

        seq = await last_seq(stack)
        again = await admin.post("/v1/policy-bundles", json=bundle_body(denying(org, ["curl"]), revision="r1"))
        assert again.status_code == 200 and again.json()["unchanged"] is True and again.json()["version"] == 1
        assert await appended_since(stack, seq, org) == [], "pushing the current content again records nothing"

        denied = problem(await admin.post("/v1/tasks", json=risky), 403)
        assert "curl" in denied["detail"]
        after = await submit(admin, q)
        assert after["policy"] == {"version": 1, "digest": v1["digest"]}
        assert (await viewer.get(f"/v1/tasks/{before['id']}")).json()["policy"]["version"] is None

        v2 = (await admin.post("/v1/policy-bundles", json=bundle_body(SHIPPED.data))).json()
        assert v2["version"] == 2 and v2["digest"] == SHIPPED.digest
        assert (await admin.post("/v1/tasks", json=risky)).status_code == 201, "version 2 lifted the denial"

        listed = (await viewer.get("/v1/policy-bundles")).json()
        assert listed["current"] == 2
        assert [item["version"] for item in listed["items"]] == [2, 1]
        full = (await viewer.get("/v1/policy-bundles/1")).json()
        assert full["modules"] == dict(SHIPPED.modules)
        assert full["data"] == denying(org, ["curl"])
        assert full["digest"] == v1["digest"] and full["wasm"] is None
        assert (await viewer.get("/v1/policy-bundles/current")).json()["version"] == 2
        problem(await viewer.get("/v1/policy-bundles/3"), 404)
        problem(await viewer.get("/v1/policy-bundles/latest"), 404)

    async with stack.client("globex", "viewer") as other_org:
        assert (await other_org.get("/v1/policy-bundles")).json()["current"] is None, "bundles are the org's own"


async def test_a_bundle_that_cannot_decide_is_refused_and_changes_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin, client(stack, keys["submitter"]) as submitter:
        seq = await last_seq(stack)
        broken = {**SHIPPED.modules, "controlplane/broken.rego": "package controlplane\n\nbroken := {{{\n"}
        refused = problem(await admin.post("/v1/policy-bundles", json={"modules": broken}), 422)
        assert "cannot be loaded" in refused["detail"]
        no_submit = {"modules": {"only.rego": "package other\n\nx := 1\n"}}
        assert "controlplane/submit" in problem(await admin.post("/v1/policy-bundles", json=no_submit), 422)["detail"]
        problem(await admin.post("/v1/policy-bundles", json={"modules": {"notes.txt": "hello"}}), 422)
        problem(await admin.post("/v1/policy-bundles", json={"modules": {}}), 422)
        problem(await admin.post("/v1/policy-bundles", json={**bundle_body({}), "wasm": "not base64!"}), 422)
        problem(
            await admin.post("/v1/policy-bundles", content=b"{not json", headers={"content-type": "application/json"}),
            400,
        )
        problem(await submitter.post("/v1/policy-bundles", json=bundle_body(SHIPPED.data)), 403)
        assert await appended_since(stack, seq, org) == [], "no refused push appended anything"
        assert (await admin.get("/v1/policy-bundles")).json()["items"] == []


@workflow("policy-pinned", version=1)
async def policy_pinned(ctx: WorkflowContext, payload: Any) -> dict[str, Any]:
    decision = await ctx.policy("controlplane/tool", {"tool": "curl"})
    return {"allow": decision["allow"]}


async def test_a_workflow_is_decided_by_the_version_its_task_was_submitted_under(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    body = {"type": "fetch", "queue": q, "workflow": {"name": "policy-pinned", "version": 1}}
    async with client(stack, keys["admin"]) as admin:
        v1 = (await admin.post("/v1/policy-bundles", json=bundle_body(denying(org, ["curl"])))).json()
        under_v1 = (await admin.post("/v1/tasks", json=body)).json()
        v2 = (await admin.post("/v1/policy-bundles", json=bundle_body(SHIPPED.data))).json()
        under_v2 = (await admin.post("/v1/tasks", json=body)).json()
        assert (under_v1["policy"]["version"], under_v2["policy"]["version"]) == (1, 2)

        async with running(stack, Registry([policy_pinned]), q, worker_key=keys["worker"]):

            async def both_done() -> bool:
                tasks = [(await admin.get(f"/v1/tasks/{t['id']}")).json() for t in (under_v1, under_v2)]
                return all(task["status"] == "completed" for task in tasks)

            await until(both_done)
        first = (await admin.get(f"/v1/tasks/{under_v1['id']}")).json()
        second = (await admin.get(f"/v1/tasks/{under_v2['id']}")).json()
    assert first["result"] == {"allow": False}, "version 1 denies curl, although version 2 is current"
    assert second["result"] == {"allow": True}
    assert first["journal"][0]["result"]["bundle_digest"] == v1["digest"]
    assert second["journal"][0]["result"]["bundle_digest"] == v2["digest"]


async def test_the_cli_pushes_a_directory_and_lists_the_versions(stack: Stack, tmp_path: Path) -> None:
    org, keys = await new_org(stack)
    for path, source in SHIPPED.modules.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    (tmp_path / "data.json").write_bytes(orjson.dumps(denying(org, ["scp"])))

    async def cli(*args: str, key: str = keys["admin"]) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controlplane",
            "policies",
            *args,
            "--url",
            stack.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "CP_API_KEY": key},
        )
        output, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, output.decode()

    code, output = await cli("push", str(tmp_path))
    assert code == 0, output
    assert output.startswith("pushed version 1 ")
    code, output = await cli("push", str(tmp_path))
    assert (code, output.startswith("unchanged: this bundle is already version 1")) == (0, True), output
    code, output = await cli("list")
    assert code == 0 and output.startswith("* v1 "), output
    code, output = await cli("push", str(tmp_path / "missing"))
    assert code == 2 and "cannot read policy bundle" in output, output
    code, output = await cli("push", str(tmp_path), key=keys["viewer"])
    assert code == 1 and "403" in output, output
    async with client(stack, keys["admin"]) as admin:
        denied = problem(await admin.post("/v1/tasks", json={"type": "t", "metadata": {"tools": ["scp"]}}), 403)
    assert "scp" in denied["detail"]
