"""``controlplane exec`` as a CI job runs it: a subprocess against the real stack, with its key in the
environment. It completes a workflow (result on stdout, exit 0), fails one that raises (exit 1), waits
for an approval a human gives through the API, cancels on Ctrl-C (exit 130), refuses a key without
the roles (exit 2), and leaves no worker registered behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.seed import seed_org
from core.domain.ids import new_id
from tests.gateway.conftest import ROLES, Stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONTROLPLANE = str(Path(sys.executable).parent / "controlplane")
WORKFLOWS = "tests.gateway.exec_workflows:ALL"
EXIT_WITHIN = 60.0


@dataclass
class ExecRun:
    """A running ``controlplane exec``: its stderr lines as they come, its stdout once it exits."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    line_added: asyncio.Event = field(default_factory=asyncio.Event)

    async def collect(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode().rstrip("\n"))
            self.line_added.set()

    async def line_matching(self, pattern: str, within: float = 30.0) -> re.Match[str]:
        async with asyncio.timeout(within):
            while True:
                for line in self.lines:
                    if found := re.search(pattern, line):
                        return found
                if self.process.returncode is not None:
                    raise AssertionError(f"exec exited ({self.process.returncode}) without {pattern!r}:\n{self.log}")
                self.line_added.clear()
                await self.line_added.wait()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def worker_id(self) -> str:
        found = next(m for line in self.lines if (m := re.match(r"runner (\S+) on queue (\S+)", line)))
        return found[1]

    @property
    def task_id(self) -> str:
        return next(m for line in self.lines if (m := re.match(r"task (\S+): ", line)))[1]


@asynccontextmanager
async def exec_run(stack: Stack, *arguments: str, key: str) -> AsyncIterator[ExecRun]:
    """``controlplane exec --workflows WORKFLOWS ARGUMENTS`` with ``key`` in $CP_API_KEY; the test package
    is on its path, as a CI job's repository root is."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CP_")}
    environment |= {"PYTHONPATH": str(REPO), "CP_API_KEY": key}
    process = await asyncio.create_subprocess_exec(
        CONTROLPLANE,
        "exec",
        "--url",
        stack.url,
        "--workflows",
        WORKFLOWS,
        *arguments,
        cwd=REPO,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run = ExecRun(process)
    collecting = asyncio.create_task(run.collect())
    try:
        yield run
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await collecting


async def finished(run: ExecRun) -> tuple[int, str]:
    """Its exit status and stdout, once it exits."""
    assert run.process.stdout is not None
    async with asyncio.timeout(EXIT_WITHIN):
        stdout = await run.process.stdout.read()
        status = await run.process.wait()
    return status, stdout.decode()


def client_of(stack: Stack, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=20)


async def status_of(stack: Stack, task_id: str, key: str | None = None) -> dict[str, Any]:
    async with client_of(stack, key or stack.keys["acme"]["admin"]) as admin:
        return (await admin.get(f"/v1/tasks/{task_id}")).json()  # type: ignore[no-any-return]


async def assert_deregistered(stack: Stack, worker_id: str, key: str | None = None) -> None:
    async with client_of(stack, key or stack.keys["acme"]["admin"]) as admin:
        assert (await admin.get(f"/v1/workers/{worker_id}")).status_code == 404


async def test_exec_completes_a_workflow_prints_its_result_and_leaves_no_worker(stack: Stack) -> None:
    arguments = ("--workflow", "exec-greet", "--payload", '{"name": "ci"}')
    async with exec_run(stack, *arguments, key=stack.keys["acme"]["admin"]) as run:
        status, stdout = await finished(run)
    assert status == 0, run.log
    assert json.loads(stdout) == {"greeting": "hello ci"}  # stdout holds the result alone
    assert re.search(r"step greet -> hello ci", run.log)
    assert re.search(r"\d\d:\d\d:\d\d  completed$", run.log, re.MULTILINE)
    task = await status_of(stack, run.task_id)
    assert (task["status"], task["result"]) == ("completed", {"greeting": "hello ci"})
    assert task["queue"].startswith("exec-")
    await assert_deregistered(stack, run.worker_id)


async def test_exec_of_a_workflow_that_raises_exits_1_with_the_error(stack: Stack) -> None:
    arguments = ("--workflow", "exec-explode", "--payload", '{"name": "ci"}')
    async with exec_run(stack, *arguments, key=stack.keys["acme"]["admin"]) as run:
        status, stdout = await finished(run)
    assert status == 1, run.log
    assert stdout == ""
    assert "failed: DeliberateFailure: nothing to deploy for ci" in run.log
    assert (await status_of(stack, run.task_id))["status"] == "failed"
    await assert_deregistered(stack, run.worker_id)


async def test_exec_waits_for_an_approval_given_through_the_api_then_completes(stack: Stack) -> None:
    arguments = ("--workflow", "exec-gated", "--payload", '{"name": "v2"}')
    async with exec_run(stack, *arguments, key=stack.keys["acme"]["admin"]) as run:
        approval_id = (await run.line_matching(r"waiting for approval (\S+): ship v2\? ship v2 to prod"))[1]
        await run.line_matching(re.escape(f"decide in the console: {stack.url}/console/approvals"))
        await run.line_matching(re.escape(f"POST {stack.url}/v1/approvals/{approval_id}/approve"))
        assert run.process.returncode is None  # it waits for the human
        async with stack.client(role="approver") as approver:
            decided = await approver.post(f"/v1/approvals/{approval_id}/approve", json={"comment": "go"})
            assert decided.status_code == 200, decided.text
        status, stdout = await finished(run)
    assert status == 0, run.log
    assert json.loads(stdout) == {"plan": "hello v2", "decision": "approved"}
    assert "policy controlplane/tool: allowed" in run.log
    assert re.search(r"llm summarise \(gpt-4o-mini, \d+ tokens.*\): ship v2 to prod", run.log)
    assert re.search(rf"voted approve on {approval_id}: go", run.log)
    assert f"approval {approval_id} approved" in run.log
    await assert_deregistered(stack, run.worker_id)


async def test_exec_on_a_prod_queue_waits_for_the_submit_policys_approval(stack: Stack) -> None:
    """The default submit policy gates every task of the prod environment: exec shows that gate too."""
    org = f"exec{new_id()[-8:]}"
    keys = await seed_org(stack.services.handler, org, ROLES)
    prod_queue = f"deploys-{new_id()[-8:]}"
    async with client_of(stack, keys["admin"]) as admin:
        defined = await admin.post("/v1/environments", json={"name": "prod", "queues": [prod_queue]})
        assert defined.status_code == 201, defined.text
    arguments = ("--workflow", "exec-greet", "--payload", '{"name": "prod"}', "--queue", prod_queue)
    async with exec_run(stack, *arguments, key=keys["admin"]) as run:
        approval_id = (await run.line_matching(r"waiting for approval (\S+): .*prod"))[1]
        await run.line_matching(re.escape(f"{stack.url}/console/approvals"))
        assert (await status_of(stack, run.task_id, keys["admin"]))["status"] == "awaiting_approval"
        async with client_of(stack, keys["approver"]) as approver:
            decided = await approver.post(f"/v1/approvals/{approval_id}/approve")
            assert decided.status_code == 200, decided.text
        status, stdout = await finished(run)
    assert status == 0, run.log
    assert json.loads(stdout) == {"greeting": "hello prod"}
    assert "approval required" in run.log  # the submit policy's decision, on the submitted line
    await assert_deregistered(stack, run.worker_id, keys["admin"])


async def test_ctrl_c_cancels_the_task_and_exits_130(stack: Stack) -> None:
    arguments = ("--workflow", "exec-gated", "--payload", '{"name": "interrupted"}')
    async with exec_run(stack, *arguments, key=stack.keys["acme"]["admin"]) as run:
        await run.line_matching(r"waiting for approval ")
        run.process.send_signal(signal.SIGINT)
        status, stdout = await finished(run)
    assert status == 130, run.log
    assert stdout == ""
    task = await status_of(stack, run.task_id)
    assert task["status"] == "cancelled"
    assert "interrupted; task" in run.log and "cancelled" in run.log
    await assert_deregistered(stack, run.worker_id)


async def test_a_timeout_cancels_the_task_and_exits_1(stack: Stack) -> None:
    arguments = ("--workflow", "exec-gated", "--payload", '{"name": "slow"}', "--timeout", "3")
    async with exec_run(stack, *arguments, key=stack.keys["acme"]["admin"]) as run:
        status, _ = await finished(run)
    assert status == 1, run.log
    assert "timed out after 3 s" in run.log
    assert (await status_of(stack, run.task_id))["status"] == "cancelled"


@pytest.mark.parametrize(
    ("role", "refused"),
    [("viewer", "may not register a worker"), ("submitter", "may not register a worker"), ("worker", "may not submit")],
)
async def test_a_key_without_both_roles_is_refused_with_what_it_needs(stack: Stack, role: str, refused: str) -> None:
    arguments = ("--workflow", "exec-greet", "--payload", '{"name": "ci"}')
    async with exec_run(stack, *arguments, key=stack.keys["acme"][role]) as run:
        status, stdout = await finished(run)
    assert status == 2, run.log
    assert stdout == ""
    assert refused in run.log
    assert "needs the admin role, or both submitter and worker" in run.log
    if role == "worker":  # it registered before the submit was refused: and deregistered after
        await assert_deregistered(stack, run.worker_id)


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (("--workflow", "no-such-flow"), "hosts no workflow no-such-flow (it hosts: exec-explode@v1"),
        (("--workflow", "exec-greet", "--version", "7"), "hosts no workflow exec-greet v7"),
        (("--workflow", "exec-greet", "--payload", "{not json"), "--payload is not JSON"),
    ],
)
async def test_usage_errors_exit_2(stack: Stack, arguments: tuple[str, ...], said: str) -> None:
    async with exec_run(stack, *arguments, key=stack.keys["acme"]["admin"]) as run:
        status, stdout = await finished(run)
    assert stdout == ""
    assert status == 2, run.log
    assert said in run.log


async def test_an_unreachable_gateway_exits_3_at_once(stack: Stack) -> None:
    arguments = ("--workflow", "exec-greet", "--url", "http://127.0.0.1:1")  # the last --url wins
    async with exec_run(stack, *arguments, key=stack.keys["acme"]["admin"]) as run:
        status, _ = await asyncio.wait_for(finished(run), 20)  # not after the client's minute of retries
    assert status == 3, run.log
    assert "cannot reach the gateway at http://127.0.0.1:1" in run.log
