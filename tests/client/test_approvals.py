"""Approvals and signals through the client: a worker asking for an approval, the pending inbox,
approving and rejecting with a structured response that must fit the approval's form, a signal
recorded on its task."""

from __future__ import annotations

import pytest

from controlplane.client import Approval, Conflict, Forbidden, Unprocessable
from tests.client.conftest import Connect
from tests.gateway.conftest import Stack
from tests.gateway.test_api import queue, submit

pytestmark = pytest.mark.integration

FORM = {
    "type": "object",
    "properties": {"ticket": {"type": "string", "pattern": "^CHG-[0-9]+$"}},
    "required": ["ticket"],
}
DETAILS = {"plan": ["scale payments to 6"], "diff": "-replicas: 4\n+replicas: 6"}


async def awaiting_approval(connect: Connect) -> Approval:
    """A task whose worker asked a human about it (with details and a form) through the client, and
    so gave up its lease: the approval it asked for."""
    q = queue()
    task = await connect("submitter").submit("deploy", queue=q)
    worker = connect("worker")
    claim = await worker.workers.claim("w1", queue=q, block_ms=5000)
    assert claim is not None and claim.task.id == task.id
    asked = await worker.workers.request_approval(claim, "scale up payments", details=DETAILS, form=FORM)
    assert (asked.task_id, asked.status, asked.approvers) == (task.id, "pending", ["role:approver"])
    assert (await worker.get(task.id)).status == "awaiting_approval"
    with pytest.raises(Conflict):
        await worker.workers.heartbeat_lease(claim)
    return asked  # type: ignore[no-any-return]


async def test_approve_with_a_response_that_fits_the_form(connect: Connect) -> None:
    asked = await awaiting_approval(connect)
    approver = connect("approver")
    pending = await approver.approvals.pending(task_id=asked.task_id, min_seq=asked.seq)
    assert [approval.id for approval in pending] == [asked.id], "another client's write, read after its seq"
    assert asked.id in [approval.id for approval in await approver.approvals.pending()]
    approval = await approver.approvals.get(asked.id)
    assert isinstance(approval, Approval)
    assert (approval.status, approval.details, approval.form, approval.reason) == (
        "pending",
        DETAILS,
        FORM,
        "scale up payments",
    )

    with pytest.raises(Unprocessable):
        await approver.approvals.approve(asked.id, response={"ticket": "tomorrow"})
    approved = await approver.approvals.approve(asked.id, comment="go", response={"ticket": "CHG-42"})
    assert approved.status == "approved" and approved.decided_at is not None
    [decision] = approved.decisions
    assert (decision.decision, decision.comment, decision.response) == ("approve", "go", {"ticket": "CHG-42"})
    with pytest.raises(Conflict):
        await approver.approvals.approve(asked.id, response={"ticket": "CHG-43"})
    assert (await approver.get(asked.task_id)).approvals[0].decisions[0].response == {"ticket": "CHG-42"}


async def test_reject_with_a_reason_and_a_response(connect: Connect) -> None:
    asked = await awaiting_approval(connect)
    with pytest.raises(Forbidden):
        await connect("viewer").approvals.reject(asked.id, "no")
    rejected = await connect("approver").approvals.reject(asked.id, "not on a Friday", response={"ticket": "CHG-7"})
    assert rejected.status == "rejected"
    [decision] = rejected.decisions
    assert (decision.decision, decision.comment, decision.response) == (
        "reject",
        "not on a Friday",
        {"ticket": "CHG-7"},
    )


async def test_a_signal_is_recorded_on_its_task(connect: Connect, stack: Stack) -> None:
    async with stack.client(role="submitter") as submitter:
        task = await submit(submitter, queue())
    client = connect("approver")
    seq = await client.signals.send(task["id"], "go-ahead", {"window": "22:00"})
    assert seq > task["seq"]
    [signalled] = await client.take(1, task_id=task["id"], after=seq - 1)
    assert (signalled.seq, signalled.type) == (seq, "TaskSignalled")
    assert (signalled.data["name"], signalled.data["payload"]) == ("go-ahead", {"window": "22:00"})
    with pytest.raises(Forbidden):
        await connect("viewer").signals.send(task["id"], "go-ahead")
    await connect("submitter").cancel(task["id"])
    with pytest.raises(Conflict):
        await client.signals.send(task["id"], "go-ahead")
