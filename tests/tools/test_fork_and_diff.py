"""``controlplane fork`` copies a task's history up to a sequence into a new, claimable task that
folds to the source's state there; ``controlplane diff`` shows where two runs part."""

from __future__ import annotations

import json

import pytest

from application.fork import FORK_BATCH
from controlplane.task_log import task_history
from core.domain.commands import (
    Actor,
    ClaimTask,
    CompleteTask,
    DecideApproval,
    HeartbeatTask,
    RecordOperation,
    RequestApproval,
    SubmitTask,
)
from core.domain.events import ApprovalTimedOut
from core.domain.history import plan_fork
from core.domain.ids import new_id
from core.domain.subjects import aggregate_subject
from core.log.event_store import AppendMeta
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from tests.tools.conftest import Cli

pytestmark = pytest.mark.integration

WORKER = Actor("w1", frozenset({"worker"}))
APPROVER = Actor("bob", frozenset({"approver"}))


async def released(
    handler: CommandHandler, org: str, task_id: str, version: str, *, lease: str, queue: str = "default"
) -> int:
    """Claim, record the shipping step and complete: the end of a release run."""
    held = {"worker_id": "w1", "lease_id": lease}
    await handler.handle(org, ClaimTask(task_id=task_id, **held, queue=queue, lease_seconds=600), actor=WORKER)
    await handler.handle(
        org, RecordOperation(task_id=task_id, **held, index=2, kind="step", name="ship", result=version), actor=WORKER
    )
    return (
        await handler.handle(org, CompleteTask(task_id=task_id, **held, result={"shipped": version}), actor=WORKER)
    ).seq


async def source_run(handler: CommandHandler, org: str) -> tuple[str, dict[str, int]]:
    """submit, claim, step, ask a human (who approves: vote and decision in one command), claim, step,
    complete; returns the task id and the sequence of each of those events."""
    task_id = new_id()
    seq: dict[str, int] = {}
    lease = {"worker_id": "w1", "lease_id": "l1"}
    seq["submit"] = (
        await handler.handle(
            org, SubmitTask(task_id=task_id, task_type="release", payload={"v": 1}), actor=Actor("alice")
        )
    ).seq
    seq["claim"] = (await handler.handle(org, ClaimTask(task_id=task_id, **lease, lease_seconds=600), actor=WORKER)).seq
    seq["plan"] = (
        await handler.handle(
            org,
            RecordOperation(task_id=task_id, **lease, index=0, kind="step", name="plan", result=["a"]),
            actor=WORKER,
        )
    ).seq
    asked = RequestApproval(
        task_id=task_id, **lease, approval_id=f"{task_id}-1", reason="ship?", journal_index=1, timeout_seconds=3600
    )
    seq["ask"] = (await handler.handle(org, asked, actor=WORKER)).seq
    decided = await handler.handle(
        org, DecideApproval(task_id=task_id, approval_id=f"{task_id}-1", decision="approve"), actor=APPROVER
    )
    seq["decided"] = decided.seq
    seq["complete"] = await released(handler, org, task_id, "v1", lease="l2")
    return task_id, seq


async def test_a_fork_folds_to_the_source_at_the_sequence_and_runs_another_way(
    handler: CommandHandler, store: JetStreamEventStore, org: str, cli: Cli
) -> None:
    source, seq = await source_run(handler, org)
    source_events = len(await task_history(store, org, source))
    fork = f"whatif-{new_id()[-8:]}"

    # Just before the decision: the fork stops where the human was asked.
    before = seq["decided"] - 1
    ran = await cli("fork", org, source, "--at", str(before), "--as", fork, "--queue", "whatif", "--json")
    assert ran.code == 0, ran.err
    made = json.loads(ran.out)
    assert (made["seq"], made["requested_seq"], made["status"], made["queue"]) == (
        seq["ask"],
        before,
        "awaiting_approval",
        "whatif",
    )

    then = json.loads((await cli("state", org, source, "--at", str(seq["ask"]), "--json")).out)
    expected = json.loads(json.dumps(then).replace(source, fork))
    expected["metadata"] = {"forked_from": {"task": source, "seq": seq["ask"]}}
    expected["queue"] = "whatif"
    forked = json.loads((await cli("state", org, fork, "--json")).out)
    assert {**forked, "seq": None} == {**expected, "seq": None}

    # The fork is claimable: its approval is its own, and the what-if run ships something else.
    await handler.handle(org, DecideApproval(task_id=fork, approval_id=f"{fork}-1", decision="approve"), actor=APPROVER)
    await released(handler, org, fork, "v2", lease="l9", queue="whatif")
    assert len(await task_history(store, org, source)) == source_events, "the source is untouched"

    diff = await cli("diff", org, source, fork, "--json")
    assert diff.code == 0
    compared = json.loads(diff.out)
    assert compared["first_divergence"] == "journal[2]"
    assert [pair["same"] for pair in compared["journal"]] == [True, True, False]
    assert {f["name"]: f["same"] for f in compared["fields"]} == {
        "payload": True,
        "status": True,
        "result": False,
        "error": True,
        "retries": True,
        "parked": True,
    }
    human = await cli("diff", org, source, fork)
    marked = [line for line in human.out.splitlines() if ">> " in line]
    assert (
        marked[0].startswith("journal[2]") and "'v1'" not in marked[0] and '"v1"' in marked[0] and '"v2"' in marked[0]
    )
    assert human.out.splitlines()[-1] == ">> first divergence: journal[2]"


async def test_a_fork_never_holds_a_lease_nobody_runs(
    handler: CommandHandler, store: JetStreamEventStore, org: str, cli: Cli
) -> None:
    source, seq = await source_run(handler, org)
    ran = await cli("fork", org, source, "--at", str(seq["plan"]), "--json")
    made = json.loads(ran.out)
    assert (made["seq"], made["status"], made["events"]) == (seq["submit"], "pending", 1)
    history = await task_history(store, org, made["task"])
    assert [type(item.event).__name__ for item in history] == ["TaskSubmitted"]
    claimed = await handler.handle(
        org, ClaimTask(task_id=made["task"], worker_id="w2", lease_id="x1"), actor=Actor("w2")
    )
    assert claimed.state.status == "running"


async def test_a_fork_refuses_to_land_on_an_existing_task_or_before_the_source_existed(
    handler: CommandHandler, store: JetStreamEventStore, org: str, cli: Cli
) -> None:
    source, seq = await source_run(handler, org)
    other, _ = await source_run(handler, org)
    before = len(await task_history(store, org, other))
    taken = await cli("fork", org, source, "--at", str(seq["ask"]), "--as", other)
    assert taken.code == 2 and f"task {other} already exists in org {org}" in taken.err
    assert len(await task_history(store, org, other)) == before
    too_early = await cli("fork", org, source, "--at", str(seq["submit"] - 1))
    assert too_early.code == 2 and "did not exist yet" in too_early.err
    bad_id = await cli("fork", org, source, "--at", str(seq["ask"]), "--as", "No.Good")
    assert bad_id.code == 2 and "invalid new task id" in bad_id.err


async def test_a_long_fork_is_written_in_batches_resumes_after_a_failure_and_arms_its_timers(
    handler: CommandHandler, store: JetStreamEventStore, org: str, cli: Cli
) -> None:
    task_id = new_id()
    lease = {"worker_id": "w1", "lease_id": "l1"}
    await handler.handle(org, SubmitTask(task_id=task_id, task_type="long"), actor=Actor("alice"))
    await handler.handle(org, ClaimTask(task_id=task_id, **lease, lease_seconds=600), actor=WORKER)
    for beat in range(FORK_BATCH * 2 + 50):
        await handler.handle(org, HeartbeatTask(task_id=task_id, **lease, progress=beat), actor=WORKER)
    asked = RequestApproval(task_id=task_id, **lease, approval_id=f"{task_id}-1", reason="more?", timeout_seconds=3600)
    at = (await handler.handle(org, asked, actor=WORKER)).seq

    fork = f"long-{new_id()[-8:]}"
    plan = plan_fork(await task_history(store, org, task_id), task_id=fork, at_seq=at)
    assert len(plan.events) == FORK_BATCH * 2 + 53
    # A first attempt that wrote only its first batch, then died:
    subject = aggregate_subject(org, "task", fork)
    meta = AppendMeta(command_id=f"fork-{fork}-0", actor="system:fork", time=plan.events[0].at)
    await store.append(subject, plan.events[:FORK_BATCH], expected_last_seq=0, meta=meta)

    ran = await cli("fork", org, task_id, "--at", str(at), "--as", fork, "--json")
    assert ran.code == 0, ran.err
    assert json.loads(ran.out)["appended"] == len(plan.events) - FORK_BATCH
    copied = await task_history(store, org, fork)
    assert [item.event for item in copied] == list(plan.events)
    assert len({item.command_id for item in copied}) == 3, "three atomic appends"
    forked = json.loads((await cli("state", org, fork, "--json")).out)
    assert (forked["status"], forked["progress"], forked["approvals"][0]["id"]) == (
        "awaiting_approval",
        FORK_BATCH * 2 + 49,
        f"{fork}-1",
    )
    timers = await store.read_subject(f"cpsched.{org}.task.{fork}.>")
    assert [item.event for item in timers] == [
        ApprovalTimedOut(at=plan.state.approvals[0].expires_at, approval_id=f"{fork}-1")
    ]

    again = await cli("fork", org, task_id, "--at", str(at), "--as", fork, "--json")
    assert json.loads(again.out)["appended"] == 0, "running it again finds it complete"
