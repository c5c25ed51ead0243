"""Finding 13: "prod needs approval" was decided on the environment the submitter declared in
``metadata``, so leaving it out (or writing "dev") skipped the approval. The environment is now the
queue's, from the org's environments on the server: what a submitter writes in its metadata decides
nothing, either way."""

from __future__ import annotations

import pytest

from core.domain.ids import new_id
from tests.gateway.conftest import Stack
from tests.security.test_lease_binding import security_stack  # noqa: F401  (fixture `stack`)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("metadata", [{}, {"environment": "dev"}, {"environment": ""}, {"environment": None}])
async def test_a_task_on_a_prod_queue_needs_approval_whatever_its_metadata_says(
    stack: Stack, metadata: dict[str, object]
) -> None:
    prod_queue = f"deploy{new_id()[-8:]}"
    async with stack.client(role="admin") as admin, stack.client(role="submitter") as submitter:
        held = (await admin.get("/v1/environments/prod")).json().get("queues", [])
        defined = await admin.put("/v1/environments/prod", json={"queues": [*held, prod_queue]})
        assert defined.status_code == 200, defined.text
        body = {"type": "deploy", "queue": prod_queue, "metadata": metadata}
        submitted = await submitter.post("/v1/tasks", json=body)
        assert submitted.status_code == 201, submitted.text
        task = submitted.json()
        assert task["environment"] == "prod"
        assert task["status"] == "awaiting_approval", f"submitted with metadata {metadata} skipped the approval"
        [gate] = task["approvals"]
        assert gate["requested_by"] == "policy" and "environment prod requires approval" in gate["reason"]
        by_name = await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "prod", **body})
        assert by_name.json()["status"] == "awaiting_approval", "naming the environment routes into it, gated"


async def test_declaring_prod_in_metadata_gates_nothing_outside_prod(stack: Stack) -> None:
    loose = f"loose{new_id()[-8:]}"
    async with stack.client(role="submitter") as submitter:
        submitted = await submitter.post(
            "/v1/tasks", json={"type": "deploy", "queue": loose, "metadata": {"environment": "prod"}}
        )
    assert submitted.status_code == 201, submitted.text
    assert (submitted.json()["environment"], submitted.json()["status"]) == (None, "pending")
