"""``state --at SEQ`` is the live state at SEQ: for random command histories on two interleaved tasks,
folding the log up to any stream sequence gives exactly the state the command handler held after the
last command it had appended by then. And ``fork --at SEQ`` copies a history that folds to that state
at the cut it chooses, holding no lease."""

from __future__ import annotations

import msgspec
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.embedded import EmbeddedNats
from controlplane.task_log import task_history
from core.domain.commands import (
    Actor,
    CancelTask,
    ClaimTask,
    Command,
    CompleteTask,
    DecideApproval,
    FailTask,
    HeartbeatTask,
    RecordOperation,
    ReportNonDeterminism,
    RequestApproval,
    ResumeTask,
    StartSleep,
    SubmitTask,
)
from core.domain.errors import Rejected
from core.domain.history import plan_fork, state_at
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.task import Task, next_approval_id
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore

TASKS = ("alpha-task", "bravo-task")
FORK = "fork-task"
WORKERS = ("w1", "w2")
APPROVERS = (Actor("alice", frozenset({"approver"})), Actor("bob", frozenset({"approver"})))
SUBMITTER = Actor("sam", frozenset({"submitter"}))
# Nothing here may fire a timer during a test: leases, sleeps and backoffs last an hour.
HOUR = 3600.0

# Weighted so that most histories get far (approvals decided, retries, parking) before they end.
CHOICES = (
    ["claim"] * 4
    + ["heartbeat"] * 2
    + ["operation"] * 4
    + ["approval"] * 3
    + ["vote"] * 4
    + ["fail"] * 2
    + ["sleep", "complete", "cancel", "nondeterminism", "resume"]
)
values = st.none() | st.integers(-1000, 1000) | st.text(max_size=6) | st.lists(st.integers(0, 9), max_size=3)


@st.composite
def command_for(draw: st.DrawFn, task_id: str, task: Task) -> tuple[Command, Actor]:
    """A command for ``task`` as it is now: mostly ones the rules accept, some they refuse."""
    held = task.lease
    stale = draw(st.integers(0, 5)) == 0
    worker = held.worker_id if held and not stale else draw(st.sampled_from(WORKERS))
    lease = {"worker_id": worker, "lease_id": held.id if held and not stale else f"stale{new_id()[-4:]}"}
    position = len(task.journal) if draw(st.integers(0, 5)) else len(task.journal) + 1
    pending = [a.id for a in task.approvals if a.status == "pending"]
    choice = draw(st.sampled_from(CHOICES))
    as_worker = Actor(worker, frozenset({"worker"}))
    match choice:
        case "claim":
            new_lease = f"l{new_id()[-8:]}"
            return ClaimTask(task_id=task_id, worker_id=worker, lease_id=new_lease, lease_seconds=HOUR), as_worker
        case "heartbeat":
            return HeartbeatTask(task_id=task_id, **lease, progress=draw(values)), as_worker
        case "operation":
            kind = draw(st.sampled_from(["step", "llm", "now"]))
            name = draw(st.sampled_from(["plan", "ship"]))
            return RecordOperation(
                task_id=task_id, **lease, index=position, kind=kind, name=name, result=draw(values)
            ), as_worker
        case "sleep":
            return StartSleep(task_id=task_id, **lease, index=position, seconds=HOUR), as_worker
        case "approval":
            return RequestApproval(
                task_id=task_id,
                **lease,
                approval_id=next_approval_id(task),
                reason="go?",
                quorum=draw(st.integers(1, 2)),
                journal_index=draw(st.none() | st.just(position)),
            ), as_worker
        case "vote":
            approval = draw(st.sampled_from(pending)) if pending else f"{task_id}-9"
            decision = draw(st.sampled_from(["approve", "reject"]))
            return DecideApproval(task_id=task_id, approval_id=approval, decision=decision, comment="because"), draw(
                st.sampled_from(APPROVERS)
            )
        case "complete":
            return CompleteTask(task_id=task_id, **lease, result=draw(values)), as_worker
        case "fail":
            return FailTask(task_id=task_id, **lease, error=draw(values), retryable=draw(st.booleans())), as_worker
        case "cancel":
            return CancelTask(task_id=task_id, reason="enough"), SUBMITTER
        case "nondeterminism":
            return ReportNonDeterminism(
                task_id=task_id, **lease, index=0, expected={"kind": "step"}, actual={"kind": "llm"}
            ), as_worker
    return ResumeTask(task_id=task_id), SUBMITTER


def check_fork(history: list[RecordedEvent], source: str, seq: int) -> None:
    """A fork at ``seq`` holds no lease and folds to the source's state at its cut, but for its ids."""
    plan = plan_fork(history, task_id=FORK, at_seq=seq)
    assert plan.seq <= seq and plan.state.lease is None
    then, cut = state_at(history, plan.seq)
    assert cut == plan.seq
    expected = msgspec.json.decode(msgspec.json.encode(then).replace(source.encode(), FORK.encode()))
    expected["metadata"]["forked_from"] = {"task": source, "seq": plan.seq}
    assert msgspec.json.decode(msgspec.json.encode(plan.state)) == expected, f"fork of {source} at {seq}"


async def scenario(url: str, data: st.DataObject) -> None:
    store = await JetStreamEventStore.connect(url)
    handler = CommandHandler(store)
    org = f"prop-{new_id()[-10:]}"
    try:
        live: dict[str, list[tuple[int, Task]]] = {}
        for task_id in TASKS:
            submit = SubmitTask(
                task_id=task_id, task_type="t", max_retries=data.draw(st.integers(0, 2)), retry_backoff_seconds=HOUR
            )
            outcome = await handler.handle(org, submit, actor=SUBMITTER)
            live[task_id] = [(outcome.seq, outcome.state)]
        for _ in range(data.draw(st.integers(1, 40), label="commands")):
            task_id = data.draw(st.sampled_from(TASKS))
            command, actor = data.draw(command_for(task_id, live[task_id][-1][1]))
            try:
                outcome = await handler.handle(org, command, actor=actor)
            except Rejected:
                continue
            live[task_id].append((outcome.seq, outcome.state))

        first = min(states[0][0] for states in live.values())
        last = max(states[-1][0] for states in live.values())
        for task_id, states in live.items():
            history = await task_history(store, org, task_id)
            for seq in range(first - 1, last + 2):  # from before the task existed to past its end
                then = [state for appended, state in states if appended <= seq]
                expected = then[-1] if then else None
                assert state_at(history, seq)[0] == expected, f"{task_id} at seq {seq}"
                if expected is not None:
                    check_fork(history, task_id, seq)
    finally:
        await store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_state_at_any_sequence_equals_the_live_state_then(nats_server: EmbeddedNats, data: st.DataObject) -> None:
    uvloop.run(scenario(nats_server.url, data))
