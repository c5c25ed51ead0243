"""The task aggregate's decisions: what each command may do to a task, as events (``decide``), and the
task decider that the command handler runs (``TASK``: these decisions with ``core.domain.task``'s fold and
timers). Pure: no I/O, no clock, no ids."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import msgspec

from core.domain.approvals import (
    requested,
    vote,
)
from core.domain.commands import (
    CancelTask,
    ClaimTask,
    Command,
    CompleteTask,
    DecideApproval,
    FailTask,
    HeartbeatTask,
    ReadSecret,
    RecordOperation,
    ReleaseLease,
    ReportNonDeterminism,
    RequestApproval,
    ResumeTask,
    SignalTask,
    StartSleep,
    SubmitTask,
    TaskCommand,
    WaitForSignal,
)
from core.domain.decider import Decider, DecisionContext
from core.domain.errors import (
    AlreadyDecided,
    AlreadyExists,
    AlreadyTerminal,
    CapabilityMismatch,
    InvalidCommand,
    InvalidTransition,
    LeaseLost,
    NotFound,
    NotReady,
)
from core.domain.events import (
    Event,
    PolicyDecided,
    PolicyDecision,
    SecretRead,
    TaskCancelled,
    TaskClaimed,
    TaskCompleted,
    TaskFailed,
    TaskHeartbeat,
    TaskLeaseReleased,
    TaskResumed,
    TaskRetryScheduled,
    TaskSubmissionDenied,
    TaskSubmitted,
    WorkflowNonDeterministic,
    WorkflowOperationRecorded,
    WorkflowRef,
    WorkflowSleepStarted,
)
from core.domain.signals import accepted_signal, taken_or_awaited
from core.domain.task import (
    Lease,
    Task,
    TaskState,
    evolve,
    hosted_workflow_versions,
    next_approval_id,
    retry_delay,
    timers,
    workflow_capability,
)

# --- decide ---------------------------------------------------------------------------------------


def decide(state: TaskState, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    if isinstance(command, SubmitTask):
        return _submit(state, command, ctx)
    assert isinstance(command, TaskCommand)
    if state is None:
        raise NotFound(f"task {command.task_id} not found")
    match command:
        case ClaimTask():
            return _claim(state, command, ctx)
        case HeartbeatTask():
            lease = _held_lease(state, command.worker_id, command.lease_id, ctx)
            seconds = command.lease_seconds or lease.seconds
            return [
                TaskHeartbeat(
                    at=ctx.now,
                    worker_id=command.worker_id,
                    lease_id=lease.id,
                    lease_expires_at=ctx.now + timedelta(seconds=seconds),
                    progress=command.progress,
                )
            ]
        case RequestApproval():
            return _request_approval(state, command, ctx)
        case DecideApproval():
            return _decide_approval(state, command, ctx)
        case CompleteTask():
            _held_lease(state, command.worker_id, command.lease_id, ctx)
            return [
                TaskCompleted(at=ctx.now, worker_id=command.worker_id, lease_id=command.lease_id, result=command.result)
            ]
        case FailTask():
            return _fail(state, command, ctx)
        case ReleaseLease():
            lease = _held_lease(state, command.worker_id, command.lease_id, ctx)
            if lease.claimed_at is not None and lease.claimed_at >= command.claimed_before:
                raise LeaseLost(
                    f"lease {lease.id} on task {state.id} was claimed at {lease.claimed_at.isoformat()}, "
                    f"not before {command.claimed_before.isoformat()}: it is not the old process's to release"
                )
            return [
                TaskLeaseReleased(
                    at=ctx.now, lease_id=command.lease_id, worker_id=command.worker_id, reason=command.reason
                )
            ]
        case CancelTask():
            _not_terminal(state, "cancel")
            return [TaskCancelled(at=ctx.now, by=ctx.actor.id, reason=command.reason)]
        case RecordOperation(kind="policy"):
            _journal_position(state, command.worker_id, command.lease_id, command.index, ctx)
            try:
                decision = msgspec.convert(command.result, PolicyDecision)
            except msgspec.ValidationError as exc:
                raise InvalidCommand(f"a policy operation's result must be a policy decision: {exc}") from None
            if decision.entrypoint != command.name:
                raise InvalidCommand(f"decision of {decision.entrypoint!r} recorded as {command.name!r}")
            return [
                PolicyDecided(
                    at=ctx.now,
                    index=command.index,
                    decision=decision,
                    worker_id=command.worker_id,
                    lease_id=command.lease_id,
                )
            ]
        case RecordOperation():
            _journal_position(state, command.worker_id, command.lease_id, command.index, ctx)
            return [
                WorkflowOperationRecorded(
                    at=ctx.now,
                    index=command.index,
                    kind=command.kind,
                    name=command.name,
                    result=command.result,
                    worker_id=command.worker_id,
                    lease_id=command.lease_id,
                )
            ]
        case StartSleep():
            _journal_position(state, command.worker_id, command.lease_id, command.index, ctx)
            return [
                WorkflowSleepStarted(
                    at=ctx.now,
                    index=command.index,
                    until=ctx.now + timedelta(seconds=command.seconds),
                    worker_id=command.worker_id,
                    lease_id=command.lease_id,
                )
            ]
        case ReportNonDeterminism():
            _held_lease(state, command.worker_id, command.lease_id, ctx)
            return [
                WorkflowNonDeterministic(
                    at=ctx.now,
                    index=command.index,
                    expected=command.expected,
                    actual=command.actual,
                    worker_id=command.worker_id,
                    lease_id=command.lease_id,
                )
            ]
        case ReadSecret():
            _held_lease(state, command.worker_id, command.lease_id, ctx)
            version = state.secret_pins.get(command.name, command.newest_version)
            if version is None:
                scope = "" if state.environment is None else f" or environment {state.environment}"
                raise NotFound(
                    f"secret {command.name} is not set for this org{scope}; an admin sets it with "
                    f"PUT /v1/secrets/{command.name}"
                )
            return [
                SecretRead(
                    at=ctx.now,
                    name=command.name,
                    version=version,
                    worker_id=command.worker_id,
                    lease_id=command.lease_id,
                    read_by=ctx.actor.id,
                )
            ]
        case SignalTask():
            _not_terminal(state, "signal")
            return [accepted_signal(state.id, state.signals, command, ctx)]
        case WaitForSignal():
            _journal_position(state, command.worker_id, command.lease_id, command.index, ctx)
            return [taken_or_awaited(state.signals, command, ctx)]
        case ResumeTask():
            _not_terminal(state, "resume")
            if state.parked is None:
                raise InvalidTransition(f"task {state.id} is not parked")
            return [TaskResumed(at=ctx.now, by=ctx.actor.id)]
    raise TypeError(f"task aggregate does not handle {type(command).__name__}")


def _submit(state: TaskState, command: SubmitTask, ctx: DecisionContext) -> Sequence[Event]:
    if state is not None:
        raise AlreadyExists(f"task {command.task_id} already exists")
    if command.policy is not None and not command.policy.allows:
        return [
            TaskSubmissionDenied(
                at=ctx.now,
                task_id=command.task_id,
                task_type=command.task_type,
                queue=command.queue,
                submitted_by=ctx.actor.id,
                decision=command.policy,
            )
        ]
    return [
        TaskSubmitted(
            at=ctx.now,
            task_id=command.task_id,
            org=ctx.org,
            queue=command.queue,
            task_type=command.task_type,
            payload=command.payload,
            priority=command.priority,
            required_capabilities=tuple(sorted(set(command.required_capabilities) | _routing(command.workflow))),
            max_retries=command.max_retries,
            timeout_seconds=command.timeout_seconds,
            retry_backoff_seconds=command.retry_backoff_seconds,
            metadata=command.metadata,
            workflow=command.workflow,
            submitted_by=ctx.actor.id,
            policy=command.policy,
            policy_version=command.policy_version,
            environment=command.environment,
            excluded_workers=tuple(sorted(set(command.excluded_workers))),
        )
    ]


def _routing(workflow: WorkflowRef | None) -> set[str]:
    return set() if workflow is None else {workflow_capability(workflow.name, workflow.version)}


def _claim(task: Task, command: ClaimTask, ctx: DecisionContext) -> Sequence[Event]:
    _not_terminal(task, "claim")
    if task.status != "pending":
        raise InvalidTransition(f"task {task.id} is {task.status}, only a pending task can be claimed")
    if task.parked is not None:
        raise NotReady(f"task {task.id} is parked ({task.parked}); resume it after fixing the workflow")
    if task.signal_wait is not None:
        raise NotReady(f"task {task.id} waits for a signal {task.signal_wait.name!r}")
    if task.queue != command.queue:
        raise InvalidTransition(f"task {task.id} is on queue {task.queue!r}, not {command.queue!r}")
    missing = set(task.required_capabilities) - set(command.capabilities)
    if missing:
        raise CapabilityMismatch(f"worker {command.worker_id} lacks capabilities {sorted(missing)}")
    if command.worker_id in task.excluded_workers:
        raise CapabilityMismatch(f"task {task.id} excludes worker {command.worker_id}")
    if task.not_before is not None and ctx.now < task.not_before:
        raise NotReady(f"task {task.id} is backing off until {task.not_before.isoformat()}")
    return [
        TaskClaimed(
            at=ctx.now,
            worker_id=command.worker_id,
            lease_id=command.lease_id,
            lease_seconds=command.lease_seconds,
            lease_expires_at=ctx.now + timedelta(seconds=command.lease_seconds),
            attempt=task.retries + 1,
            workflow_version=_version_to_pin(task.workflow, command.capabilities),
            claimed_by=ctx.actor.id,
        )
    ]


def _version_to_pin(workflow: WorkflowRef | None, capabilities: Sequence[str]) -> int | None:
    if workflow is None or workflow.version is not None:
        return None
    hosted = hosted_workflow_versions(capabilities).get(workflow.name)
    return max(hosted) if hosted else None


def _request_approval(task: Task, command: RequestApproval, ctx: DecisionContext) -> Sequence[Event]:
    if command.journal_index is not None:
        _journal_position(task, command.worker_id, command.lease_id, command.journal_index, ctx)
    _held_lease(task, command.worker_id, command.lease_id, ctx)
    approval_id = command.approval_id or next_approval_id(task)
    if task.approval(approval_id) is not None:
        raise AlreadyExists(f"approval {approval_id} already exists on task {task.id}")
    return [requested(msgspec.structs.replace(command, approval_id=approval_id), ctx)]


def _decide_approval(task: Task, command: DecideApproval, ctx: DecisionContext) -> Sequence[Event]:
    approval = task.approval(command.approval_id)
    if approval is None:
        raise NotFound(f"approval {command.approval_id} not found on task {task.id}")
    if approval.status != "pending":
        raise AlreadyDecided(f"approval {approval.id} is already {approval.status}")
    _not_terminal(task, "decide an approval of")
    return vote(approval, command, ctx)


def _fail(task: Task, command: FailTask, ctx: DecisionContext) -> Sequence[Event]:
    _held_lease(task, command.worker_id, command.lease_id, ctx)
    if command.retryable and task.retries < task.max_retries:
        attempt = task.retries + 1
        return [
            TaskRetryScheduled(
                at=ctx.now,
                worker_id=command.worker_id,
                lease_id=command.lease_id,
                error=command.error,
                attempt=attempt,
                not_before=ctx.now + retry_delay(task.id, attempt, task.retry_backoff_seconds),
            )
        ]
    return [TaskFailed(at=ctx.now, worker_id=command.worker_id, lease_id=command.lease_id, error=command.error)]


def _not_terminal(task: Task, action: str) -> None:
    if task.is_terminal:
        raise AlreadyTerminal(f"cannot {action} task {task.id}: it is already {task.status}")


def _journal_position(task: Task, worker_id: str, lease_id: str, index: int, ctx: DecisionContext) -> None:
    """Only the lease holder appends, and only at the next position: two runners can never
    interleave one journal."""
    _held_lease(task, worker_id, lease_id, ctx)
    if index != len(task.journal):
        raise InvalidCommand(
            f"journal of task {task.id} has {len(task.journal)} operations; "
            f"the next one is index {len(task.journal)}, not {index}"
        )


def _held_lease(task: Task, worker_id: str, lease_id: str, ctx: DecisionContext) -> Lease:
    """The lease a lease-bound command names, if the command's actor holds it: the credential that
    claimed (whatever its roles), with the lease's id and worker id. Anyone else gets the very refusal a
    wrong lease id gets, so a refusal tells nothing about who holds the task."""
    _not_terminal(task, "act on the lease of")
    lease = task.lease
    if (
        task.status != "running"
        or lease is None
        or lease.id != lease_id
        or lease.worker_id != worker_id
        or (lease.holder is not None and lease.holder != ctx.actor.id)
    ):
        raise LeaseLost(
            f"lease {lease_id} of worker {worker_id} is not held on task {task.id} "
            f"(task is {task.status}); claim the task again"
        )
    if ctx.now >= lease.expires_at:
        raise LeaseLost(f"lease {lease_id} on task {task.id} expired at {lease.expires_at.isoformat()}")
    return lease


TASK = Decider[TaskState](
    aggregate="task",
    commands=(
        SubmitTask,
        ClaimTask,
        HeartbeatTask,
        RequestApproval,
        DecideApproval,
        CompleteTask,
        FailTask,
        CancelTask,
        RecordOperation,
        ReleaseLease,
        StartSleep,
        ReportNonDeterminism,
        ResumeTask,
        SignalTask,
        WaitForSignal,
        ReadSecret,
    ),
    initial=None,
    decide=decide,
    evolve=evolve,
    timers=timers,
    aggregate_id=lambda command: command.task_id,  # type: ignore[attr-defined]
)
