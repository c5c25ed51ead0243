"""The in-memory claim index against the rule it stands for: the claimable tasks are the pending,
unparked ones not waiting for a signal, whose backoff has passed and whose capabilities the worker has
(and, for a runner, that run a workflow), best priority first, then oldest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from application.open_tasks import OpenTasks, claim_order
from core.domain.events import PRIORITY_RANK, TaskStatus, WorkflowRef
from core.domain.signals import SignalWait
from core.domain.task import Task

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES: tuple[TaskStatus, ...] = ("pending", "running", "awaiting_approval", "completed", "failed", "cancelled")


@st.composite
def task_states(draw: st.DrawFn) -> tuple[str, Task]:
    number = draw(st.integers(0, 11))
    task_id = f"t{number}"
    org = draw(st.sampled_from(["acme", "globex"]))
    created = T0 + timedelta(seconds=draw(st.integers(0, 5)))
    task = Task(
        id=task_id,
        org=org,
        queue=("default", "gpu")[number % 2],  # a task never changes queue
        task_type="t",
        payload=None,
        status=draw(st.sampled_from(STATUSES)),
        priority=draw(st.sampled_from(list(PRIORITY_RANK))),
        required_capabilities=tuple(sorted(draw(st.sets(st.sampled_from(["a", "b"]))))),
        metadata={},
        retries=0,
        max_retries=3,
        timeout_seconds=None,
        retry_backoff_seconds=1,
        workflow=draw(st.none() | st.just(WorkflowRef("w", 1))),
        submitted_by="s",
        created_at=created,
        updated_at=created,
        not_before=draw(st.none() | st.just(T0 + timedelta(seconds=10))),
        parked=draw(st.none() | st.just("non-deterministic")),
        signal_wait=draw(st.none() | st.just(SignalWait(index=0, name="go", since=T0, until=None))),
    )
    return org, task


@given(
    states=st.lists(task_states(), max_size=60),
    capabilities=st.sets(st.sampled_from(["a", "b"])),
    now=st.sampled_from([T0, T0 + timedelta(seconds=20)]),
    limit=st.integers(1, 20),
    workflows_only=st.booleans(),
)
def test_candidates_are_the_claimable_tasks_in_claim_order(
    states: list[tuple[str, Task]], capabilities: set[str], now: datetime, limit: int, workflows_only: bool
) -> None:
    index = OpenTasks()
    latest: dict[tuple[str, str], tuple[Task, int]] = {}
    in_log_order = [(state, seq) for seq, state in enumerate(states, start=1)]  # each at its own stream seq
    for (org, task), seq in in_log_order:
        index.put(org, task, seq)
        known = latest.get((org, task.id))
        if known is None or seq > known[1]:
            latest[(org, task.id)] = (task, seq)
    for (org, task), seq in in_log_order:  # an older state of an open task, arriving late, changes nothing
        if not latest[(org, task.id)][0].is_terminal:
            index.put(org, task, seq)
    for org in ("acme", "globex"):
        for queue in ("default", "gpu"):
            expected = sorted(
                (
                    task
                    for (task_org, _), (task, _) in latest.items()
                    if task_org == org
                    and task.queue == queue
                    and task.status == "pending"
                    and task.parked is None
                    and task.signal_wait is None
                    and (task.not_before is None or task.not_before <= now)
                    and set(task.required_capabilities) <= capabilities
                    and (task.workflow is not None or not workflows_only)
                ),
                key=claim_order,
            )
            found = index.candidates(org, queue, sorted(capabilities), now, limit, workflows_only=workflows_only)
            assert found == [t.id for t in expected][:limit]
    open_tasks = [(org, task) for (org, _), (task, _) in latest.items() if not task.is_terminal]
    assert len(index) == len(open_tasks)
    for org in ("acme", "globex"):
        assert index.in_flight(org) == sum(task_org == org for task_org, _ in open_tasks)
        for queue in ("default", "gpu"):
            expected = sum(task_org == org and task.queue == queue for task_org, task in open_tasks)
            assert index.in_flight(org, queue) == expected
