"""The console tests' harness works: ``controlplane dev`` is up with its runner and example workflows,
and the browser reaches the gateway."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import nats
import psutil
from playwright.sync_api import Page

from tests.console.conftest import DevStack, screenshot


def test_the_browser_reaches_the_gateway(dev_stack: DevStack, page: Page) -> None:
    response = page.goto(f"{dev_stack.gateway_url}/healthz")
    assert response is not None
    assert response.status == 200
    assert response.json() == {"status": "ok"}
    assert '"ok"' in page.locator("body").inner_text()
    assert screenshot(page, "smoke-healthz").stat().st_size > 0


def test_the_dev_runner_takes_an_example_workflow_to_its_approval(dev_stack: DevStack) -> None:
    body = {"type": "agent-deploy", "workflow": {"name": "agent-deploy"}, "payload": {"environment": "prod"}}
    with dev_stack.client("acme", "admin") as admin:
        submitted = admin.post("/v1/tasks", json=body)
        assert submitted.status_code == 201, submitted.text
        task_id = submitted.json()["id"]
        deadline = time.monotonic() + 30
        task: dict[str, Any] = submitted.json()
        while task["status"] != "awaiting_approval":
            assert time.monotonic() < deadline, f"still {task['status']} after 30 s: {task}\n{dev_stack.logs()}"
            assert task["status"] in {"pending", "running"}, f"{task}\n{dev_stack.logs()}"
            time.sleep(0.2)
            fetched = admin.get(f"/v1/tasks/{task_id}")
            assert fetched.status_code == 200, fetched.text
            task = fetched.json()
    assert "prod" in task["approvals"][0]["reason"]


def test_the_dev_stack_logs_every_process_in_with_least_privilege(dev_stack: DevStack) -> None:
    """Finding 10 and 11 on the real ``controlplane dev``: NATS refuses anonymous clients, every
    process's login is in dev.json (mode 0600) and nowhere on a command line, and the running
    gateway and projector use their own PostgreSQL roles."""
    info = dev_stack.info
    assert "@" in info["nats_url"]  # the control plane's login
    assert set(info["nats_integrations"]) == {"acme", "globex"}
    logins = info["database_logins"]
    assert logins["gateway"].startswith("postgresql://cp_gateway:")
    assert logins["projector"].startswith("postgresql://cp_projector:")
    secrets = [info["nats_url"].split("@")[0].rsplit(":", 1)[1]]
    secrets += [login["password"] for login in info["nats_integrations"].values()]
    for process in psutil.process_iter(["cmdline"]):
        command_line = " ".join(process.info["cmdline"] or ())
        assert not any(secret in command_line for secret in secrets), command_line

    async def check() -> tuple[str, list[str]]:
        anonymous = await _anonymous_answer(info["nats_url"].split("@")[1])
        conn = await asyncpg.connect(info["database_url"])
        try:
            users = await conn.fetch(
                "SELECT DISTINCT usename FROM pg_stat_activity"
                " WHERE datname = current_database() AND usename LIKE 'cp\\_%'"
            )
        finally:
            await conn.close()
        return anonymous, sorted(row["usename"] for row in users)

    with ThreadPoolExecutor(1) as thread:  # Playwright's sync API keeps an event loop in this thread
        anonymous, users = thread.submit(asyncio.run, check()).result()
    assert "Authorization Violation" in anonymous
    assert users == ["cp_gateway", "cp_projector"]


async def _anonymous_answer(address: str) -> str:
    try:
        connection = await nats.connect(f"nats://{address}", allow_reconnect=False, connect_timeout=2)
    except Exception as refused:  # what the server said is the point
        return str(refused)
    await connection.close()
    return "connected"
