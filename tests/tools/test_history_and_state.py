"""``controlplane history`` and ``controlplane state``: a readable timeline and the state at any
sequence, and clear errors (no traceback) for unknown tasks, bad ids and unreachable servers."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from controlplane.cli import main
from core.domain.commands import Actor, ClaimTask, HeartbeatTask, RecordOperation, SubmitTask
from core.domain.events import PolicyDecision, TaskLeaseExpired
from core.domain.ids import new_id
from core.domain.subjects import aggregate_subject
from core.log.event_store import AppendMeta
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from tests.tools.conftest import Cli

pytestmark = pytest.mark.integration

WORKER = Actor("w1", frozenset({"worker"}))


async def a_task(handler: CommandHandler, org: str) -> tuple[str, list[int]]:
    task_id = new_id()
    seqs = [
        (
            await handler.handle(
                org, SubmitTask(task_id=task_id, task_type="build", payload={"ref": "main"}), actor=Actor("alice")
            )
        ).seq
    ]
    lease = {"worker_id": "w1", "lease_id": "l1"}
    seqs.append((await handler.handle(org, ClaimTask(task_id=task_id, **lease, lease_seconds=600), actor=WORKER)).seq)
    seqs.append(
        (
            await handler.handle(
                org,
                RecordOperation(task_id=task_id, **lease, index=0, kind="step", name="compile", result="ok"),
                actor=WORKER,
            )
        ).seq
    )
    seqs.append((await handler.handle(org, HeartbeatTask(task_id=task_id, **lease, progress=0.5), actor=WORKER)).seq)
    return task_id, seqs


async def test_history_is_a_timeline_of_every_event(
    handler: CommandHandler, store: JetStreamEventStore, org: str, cli: Cli
) -> None:
    task_id, seqs = await a_task(handler, org)
    # A lease timer that fires after its lease was renewed folds to nothing: the timeline says so.
    state, _ = await handler.load(org, "task", task_id)
    stale = TaskLeaseExpired(at=state.lease.expires_at - timedelta(minutes=5), lease_id="l1")
    meta = AppendMeta(command_id=new_id(), actor="system:timer", time=stale.at)
    [stale_seq] = await store.append(
        aggregate_subject(org, "task", task_id), [stale], expected_last_seq=seqs[-1], meta=meta
    )

    ran = await cli("history", org, task_id)
    assert ran.code == 0, ran.err
    header, *rows = ran.out.splitlines()
    assert header.split() == ["SEQ", "TIME", "ACTOR", "EVENT", "SUMMARY"]
    assert [int(row.split()[0]) for row in rows] == [*seqs, stale_seq]
    assert "TaskSubmitted" in rows[0] and "alice" in rows[0] and "submitted 'build' to queue default" in rows[0]
    assert "operation 0: step 'compile' -> \"ok\"" in rows[2]
    assert rows[-1].endswith("lease l1 expired (no effect)")

    as_json = json.loads((await cli("history", org, task_id, "--json")).out)
    assert [entry["type"] for entry in as_json] == [
        "TaskSubmitted",
        "TaskClaimed",
        "WorkflowOperationRecorded",
        "TaskHeartbeat",
        "TaskLeaseExpired",
    ]
    assert as_json[1]["event"]["lease_id"] == "l1" and as_json[1]["actor"] == "w1"
    assert [entry["changed"] for entry in as_json] == [True, True, True, True, False]


async def test_state_at_a_sequence_and_now(handler: CommandHandler, org: str, cli: Cli) -> None:
    task_id, seqs = await a_task(handler, org)
    then = json.loads((await cli("state", org, task_id, "--at", str(seqs[1]), "--json")).out)
    assert (then["status"], then["journal"], then["seq"], then["lease"]["id"]) == ("running", [], seqs[1], "l1")
    now = json.loads((await cli("state", org, task_id, "--json")).out)
    assert [e["name"] for e in now["journal"]] == ["compile"] and now["progress"] == 0.5 and now["seq"] == seqs[-1]

    human = await cli("state", org, task_id, "--at", str(seqs[2] + 1))
    assert human.code == 0
    assert f"at seq {seqs[2]} (last event at or before {seqs[2] + 1})" in human.out
    assert "status      running" in human.out and "'compile' -> \"ok\"" in human.out

    before = await cli("state", org, task_id, "--at", str(seqs[0] - 1))
    assert before.code == 2
    assert f"did not exist yet at seq {seqs[0] - 1}" in before.err


async def test_errors_are_one_clear_line(org: str, cli: Cli) -> None:
    unknown = await cli("history", org, "nope")
    assert (unknown.code, unknown.err.strip()) == (2, f"controlplane: no task nope in org {org}")
    bad = await cli("state", "Acme.>", "t1")
    assert bad.code == 2 and "invalid org 'Acme.>'" in bad.err and "Traceback" not in bad.err
    unreachable = await cli("history", org, "t1", "--nats-url", "nats://127.0.0.1:9")
    assert unreachable.code == 3 and "cannot reach a server" in unreachable.err and "Traceback" not in unreachable.err
    not_a_seq = await cli("state", org, "t1", "--at", "-3")
    assert not_a_seq.code == 2


@pytest.mark.parametrize(
    "command", [["history"], ["state"], ["verify"], ["export"], ["audit", "verify"], ["fork"], ["diff"]]
)
def test_every_command_has_help_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "examples:\n  controlplane " in capsys.readouterr().out


async def test_a_denied_submission_has_a_history_but_never_a_state(handler: CommandHandler, org: str, cli: Cli) -> None:
    task_id = new_id()
    denial = PolicyDecision(
        entrypoint="controlplane/submit",
        value={"allow": False, "reasons": ["no deploys on fridays"]},
        engine="test",
        bundle_digest="sha256:b",
        input_digest="sha256:i",
        duration_ms=0.1,
    )
    submit = SubmitTask(task_id=task_id, task_type="deploy", policy=denial)
    seq = (await handler.handle(org, submit, actor=Actor("alice"))).seq

    history = await cli("history", org, task_id)
    assert "TaskSubmissionDenied" in history.out and "no deploys on fridays" in history.out
    state = await cli("state", org, task_id)
    assert (state.code, state.err.strip()) == (
        2,
        f"controlplane: task {task_id} in org {org}: it was never created: its submission was denied",
    )
    fork = await cli("fork", org, task_id, "--at", str(seq))
    assert fork.code == 2 and "never created" in fork.err
