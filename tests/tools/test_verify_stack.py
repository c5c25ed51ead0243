"""``controlplane verify`` against histories recorded by a real runner through the real stack: the
unchanged workflow passes, a changed one is flagged with both sides, and nothing runs for real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import litellm
import pytest

from controlplane.seed import seed_org
from core.domain.ids import new_id
from runners.registry import Registry
from tests.gateway.conftest import ROLES
from tests.gateway.test_runner import running, until
from tests.tools import release_v1
from tests.tools.conftest import Cli, Ran, ToolsStack

pytestmark = pytest.mark.integration

V1 = "tests.tools.release_v1:ALL"
V2 = "tests.tools.release_v2:ALL"


@pytest.fixture(scope="module")
def llm_calls_counted() -> Iterator[None]:
    """Every model call in this module counts in ``release_v1.runs["llm"]``."""
    real_completion = litellm.acompletion

    async def counted(*args: Any, **kwargs: Any) -> Any:
        release_v1.runs["llm"] += 1
        return await real_completion(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(litellm, "acompletion", counted)
        yield


@pytest.fixture(scope="module")
async def recorded_runs(tools_stack: ToolsStack, llm_calls_counted: None) -> dict[str, Any]:
    """In a fresh org: a release without approval (completed), one approved (completed) and one
    waiting for a human (awaiting_approval), all run by a real runner hosting release_v1."""
    stack = tools_stack.stack
    org = f"tools-{new_id()[-10:]}"
    keys = await seed_org(stack.services.handler, org, ROLES)
    queue = f"q{new_id()[-8:]}"

    def client(role: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {keys[role]}"}, timeout=20)

    async with (
        client("admin") as admin,
        client("approver") as approver,
        running(stack, Registry(release_v1.ALL), queue, worker_key=keys["worker"]),
    ):

        async def submit(payload: dict[str, Any]) -> str:
            body = {
                "type": "release",
                "queue": queue,
                "payload": payload,
                "workflow": {"name": "tools-release", "version": 1},
            }
            return str((await admin.post("/v1/tasks", json=body)).json()["id"])

        async def reaches(task_id: str, status: str) -> dict[str, Any]:
            async def check() -> bool:
                return (await admin.get(f"/v1/tasks/{task_id}")).json()["status"] == status

            await until(check, within=30)
            return (await admin.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]

        direct = await submit({"service": "web"})
        approved = await submit({"service": "db", "needs_approval": True})
        waiting = await submit({"service": "cache", "needs_approval": True})
        await reaches(direct, "completed")
        asked = await reaches(approved, "awaiting_approval")
        await approver.post(f"/v1/approvals/{asked['approvals'][0]['id']}/approve")
        done = await reaches(approved, "completed")
        await reaches(waiting, "awaiting_approval")
    # The runtime may journal more (policy checks before a model call); these are the workflow's own.
    ours = [e for e in done["journal"] if e["kind"] != "policy"]
    assert [e["name"] for e in ours] == ["plan", "summarise", "approval", "ship"]
    assert release_v1.runs["llm"] == 3, "the runs really called the (mock) model"
    return {
        "nats_url": tools_stack.nats_url,
        "org": org,
        "direct": direct,
        "approved": approved,
        "waiting": waiting,
        "ship_index": ours[-1]["index"],
    }


async def verify(cli: Cli, runs: dict[str, Any], *args: str) -> Ran:
    return await cli("verify", runs["org"], "--nats-url", runs["nats_url"], *args)


async def test_verify_passes_the_unchanged_workflow_and_runs_nothing(recorded_runs: dict[str, Any], cli: Cli) -> None:
    runs_before = release_v1.runs.copy()
    ran = await verify(cli, recorded_runs, "--workflows", V1, "--json")
    assert ran.code == 0, ran.out + ran.err
    reports = {r["task_id"]: r for r in json.loads(ran.out)}
    assert {r["outcome"] for r in reports.values()} == {"ok"}
    assert "returns the recorded result" in reports[recorded_runs["direct"]]["reason"]
    assert "returns the recorded result" in reports[recorded_runs["approved"]]["reason"]
    assert reports[recorded_runs["waiting"]]["status"] == "awaiting_approval"
    assert "waits where the task waits" in reports[recorded_runs["waiting"]]["reason"]
    assert release_v1.runs == runs_before, "no step and no LLM call ran during verification"


async def test_verify_flags_the_changed_workflow_with_both_sides(recorded_runs: dict[str, Any], cli: Cli) -> None:
    runs_before = release_v1.runs.copy()
    ran = await verify(cli, recorded_runs, "--workflows", V2, "--json")
    assert ran.code == 1, ran.out + ran.err
    reports = {r["task_id"]: r for r in json.loads(ran.out)}
    diverged = reports[recorded_runs["approved"]]
    assert diverged["outcome"] == "divergence"
    assert diverged["recorded"] == {"kind": "step", "name": "ship"}
    assert diverged["code"] == {"kind": "step", "name": "notify"}
    assert f"operation {recorded_runs['ship_index']}:" in diverged["reason"]
    # The change only touches what happens after an approval: the other two still replay.
    assert reports[recorded_runs["direct"]]["outcome"] == "ok"
    assert reports[recorded_runs["waiting"]]["outcome"] == "ok"
    assert release_v1.runs == runs_before, "the changed code's new step did not run either"

    human = await verify(cli, recorded_runs, "--workflows", V2)
    assert human.code == 1
    line = next(line for line in human.out.splitlines() if line.startswith("DIVERGED"))
    assert recorded_runs["approved"] in line and "step 'ship'" in line and "step 'notify'" in line
    assert "1 diverged" in human.out.splitlines()[-1]


async def test_verify_one_task_or_only_unfinished_ones(recorded_runs: dict[str, Any], cli: Cli) -> None:
    one = await verify(cli, recorded_runs, "--workflows", V2, "--task", recorded_runs["waiting"])
    assert one.code == 0, one.out + one.err
    assert one.out.startswith(f"ok        {recorded_runs['waiting']}")

    active = await verify(cli, recorded_runs, "--workflows", V2, "--active", "--json")
    assert active.code == 0
    assert [r["task_id"] for r in json.loads(active.out)] == [recorded_runs["waiting"]]

    unknown = await verify(cli, recorded_runs, "--workflows", "tests.tools.nowhere:ALL")
    assert unknown.code == 2
    assert "cannot load workflows" in unknown.err
