"""The console tests' harness works: ``controlplane dev`` is up with its runner and example workflows,
and the browser reaches the gateway."""

from __future__ import annotations

import time
from typing import Any

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
