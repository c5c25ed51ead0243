"""The task aggregate: the unit of work and the workflow instance. Pure: no I/O, no clock, no ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from core.domain.commands import (
    Actor,
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
from core.domain.decider import Decider, DecisionContext, Timer
from core.domain.errors import (
    AlreadyDecided,
    AlreadyExists,
    AlreadyTerminal,
    CapabilityMismatch,
    InvalidCommand,
    InvalidTransition,
    LeaseLost,
    NotFound,
    NotPermitted,
    NotReady,
)
from core.domain.events import (
    TERMINAL_STATUSES,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    ApprovalTimedOut,
    ApprovalVoteCast,
    Escalation,
    Event,
    PolicyDecided,
    PolicyDecision,
    Priority,
    SecretRead,
    SignalConsumed,
    SignalWaitStarted,
    SignalWaitTimedOut,
    TaskCancelled,
    TaskClaimed,
    TaskCompleted,
    TaskFailed,
    TaskHeartbeat,
    TaskLeaseExpired,
    TaskLeaseReleased,
    TaskResumed,
    TaskRetryDue,
    TaskRetryScheduled,
    TaskSignalled,
    TaskStatus,
    TaskSubmissionDenied,
    TaskSubmitted,
    TaskTimedOut,
    WorkflowNonDeterministic,
    WorkflowOperationRecorded,
    WorkflowRef,
    WorkflowSleepStarted,
)

MAX_BACKOFF = timedelta(minutes=10)
TIMER_EVENTS = (
    TaskLeaseExpired,
    TaskRetryDue,
    TaskTimedOut,
    ApprovalTimedOut,
    ApprovalEscalated,
    SignalWaitTimedOut,
)
APPROVER_ROLES = frozenset({"approver", "admin"})
SIGNAL_ROLES = frozenset({"admin", "submitter", "approver"})
MAX_PENDING_SIGNALS = 64
"""Signals a task keeps for waits that have not come yet: each may carry 64 KiB, and the whole task is
one row of the read model, so a flood is refused (409) rather than kept."""
POLICY_GATE = "policy"
"""``requested_by`` of the approval a submit policy requires before anyone may work on the task."""


class Lease(msgspec.Struct, frozen=True):
    id: str
    worker_id: str
    seconds: float
    expires_at: datetime
    holder: str | None = None
    """The actor id of the credential that claimed: only it may use the lease (None: a lease claimed
    before leases were bound to credentials, usable with its id and worker id alone)."""
    claimed_at: datetime | None = None
    """When it was claimed (None in states folded before this was kept): a worker's restart releases
    only leases taken before the new process registered."""


class ApprovalVote(msgspec.Struct, frozen=True):
    by: str
    decision: str
    comment: str | None
    at: datetime
    response: Any = None


class Approval(msgspec.Struct, frozen=True):
    id: str
    task_id: str
    status: str
    reason: str
    requested_by: str
    requested_by_actor: str
    approvers: tuple[str, ...]
    quorum: int
    decisions: tuple[ApprovalVote, ...]
    created_at: datetime
    expires_at: datetime | None
    decided_at: datetime | None
    escalation: Escalation | None
    escalated: bool = False
    details: Any = None
    """What is being approved (a plan, a diff, a tool call), as the requester attached it."""
    form: dict[str, Any] | None = None
    """A JSON Schema every decision's ``response`` fits (checked by the gateway, not here)."""
    kind: str = "approval"
    """``question`` when a workflow asked a human something (``ctx.ask``), else ``approval``."""


class JournalEntry(msgspec.Struct, frozen=True):
    """One durable operation of a workflow, in order: what a replay answers from."""

    index: int
    kind: str
    name: str
    result: Any
    at: datetime


class Signal(msgspec.Struct, frozen=True):
    """A signal the task received and keeps until a wait for its name takes it."""

    number: int
    """Its place among all the signals the task received, from 1: what a ``SignalConsumed`` names."""
    name: str
    payload: Any
    by: str
    at: datetime

    def delivered(self) -> dict[str, Any]:
        """What ``wait_for_signal`` returns, and the journal records, for this signal."""
        return {"name": self.name, "payload": self.payload, "by": self.by, "at": msgspec.to_builtins(self.at)}


class SignalWait(msgspec.Struct, frozen=True):
    """A workflow waiting, at position ``index`` of its journal, for a signal ``name``."""

    index: int
    name: str
    since: datetime
    until: datetime | None
    """When the wait gives up (a timer), None for never."""


class PolicyPin(msgspec.Struct, frozen=True):
    """The policy bundle a task was submitted under, which decides every policy its workflow asks:
    the org's pushed ``version``, or None for the shipped policies (``digest`` names them anyway)."""

    version: int | None
    digest: str


class Task(msgspec.Struct, frozen=True):
    id: str
    org: str
    queue: str
    task_type: str
    payload: Any
    status: TaskStatus
    priority: Priority
    required_capabilities: tuple[str, ...]
    metadata: dict[str, Any]
    retries: int
    max_retries: int
    timeout_seconds: float | None
    retry_backoff_seconds: float
    workflow: WorkflowRef | None
    submitted_by: str
    created_at: datetime
    updated_at: datetime
    assigned_worker: str | None = None
    lease: Lease | None = None
    result: Any = None
    error: Any = None
    progress: Any = None
    approvals: tuple[Approval, ...] = ()
    completed_at: datetime | None = None
    started_at: datetime | None = None
    deadline_at: datetime | None = None
    not_before: datetime | None = None
    cancellation_reason: str | None = None
    journal: tuple[JournalEntry, ...] = ()
    signals: tuple[Signal, ...] = ()
    """Signals received and not yet taken by a wait, in arrival order."""
    signals_received: int = 0
    """How many signals the task has received in all: the next one is number ``signals_received + 1``."""
    signal_wait: SignalWait | None = None
    """The workflow's wait for a signal, while it lasts: the task is pending but no worker may claim it."""
    parked: str | None = None
    policy: PolicyPin | None = None
    environment: str | None = None
    """The environment of its queue at submit, as recorded then (None: the queue had none)."""
    excluded_workers: tuple[str, ...] = ()
    """Worker ids never offered this task; a claim by one of them is refused."""
    secret_pins: dict[str, int] = {}
    """The version of each secret the task read first (its later reads get that version again)."""

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def approval(self, approval_id: str) -> Approval | None:
        return next((a for a in self.approvals if a.id == approval_id), None)


TaskState = Task | None


def next_approval_id(task: Task) -> str:
    """Approval ids are ``<task id>-<n>``: an approval is found from its id alone, on its task's subject."""
    return f"{task.id}-{len(task.approvals) + 1}"


def task_id_of_approval(approval_id: str) -> str | None:
    task_id, _, ordinal = approval_id.rpartition("-")
    return task_id if task_id and ordinal.isdigit() else None


def workflow_capability(name: str, version: int | None) -> str:
    """What a workflow task requires of its runner: a version pins it, none accepts any host of the name."""
    return f"workflow:{name}" if version is None else f"workflow:{name}@v{version}"


def hosted_workflow_versions(capabilities: Iterable[str]) -> dict[str, set[int]]:
    """Workflow name -> versions, read from a runner's ``workflow:<name>@v<version>`` capabilities."""
    hosted: dict[str, set[int]] = {}
    for capability in capabilities:
        if not capability.startswith("workflow:"):
            continue
        name, pinned, version = capability.removeprefix("workflow:").rpartition("@v")
        if pinned and version.isdigit():
            hosted.setdefault(name, set()).add(int(version))
    return hosted


def _pinned(task: Task, version: int | None) -> Task:
    """The task bound to ``version`` of its workflow, if it named none: it now requires that version."""
    if version is None or task.workflow is None or task.workflow.version is not None:
        return task
    name = task.workflow.name
    required = set(task.required_capabilities) - {workflow_capability(name, None)}
    required.add(workflow_capability(name, version))
    return msgspec.structs.replace(
        task, workflow=WorkflowRef(name, version), required_capabilities=tuple(sorted(required))
    )


def retry_delay(task_id: str, attempt: int, base_seconds: float) -> timedelta:
    """Exponential backoff with jitter in [0, 25%) derived from the task and attempt, so a replay
    computes the very same moment."""
    digest = hashlib.blake2b(f"{task_id}:{attempt}".encode(), digest_size=8).digest()
    jitter = int.from_bytes(digest, "big") / 2**64 * 0.25
    exponential = timedelta(seconds=base_seconds * 2 ** max(attempt - 1, 0))
    return min(exponential, MAX_BACKOFF) * (1 + jitter)


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
            return _signal(state, command, ctx)
        case WaitForSignal():
            return _wait_for_signal(state, command, ctx)
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
    if task.approval(command.approval_id) is not None:
        raise AlreadyExists(f"approval {command.approval_id} already exists on task {task.id}")
    named = {a for a in command.approvers if not a.startswith("role:")}
    if named and len(named) == len(set(command.approvers)) and len(named) < command.quorum:
        raise InvalidCommand(f"quorum {command.quorum} can never be reached by the {len(named)} named approvers")
    return [
        ApprovalRequested(
            at=ctx.now,
            approval_id=command.approval_id,
            lease_id=command.lease_id,
            requested_by=command.worker_id,
            requested_by_actor=ctx.actor.id,
            reason=command.reason,
            approvers=tuple(dict.fromkeys(command.approvers)),
            quorum=command.quorum,
            expires_at=None
            if command.timeout_seconds is None
            else ctx.now + timedelta(seconds=command.timeout_seconds),
            escalation=command.escalation,
            journal_index=command.journal_index,
            details=command.details,
            form=command.form,
            kind=command.kind,
        )
    ]


def _signal(task: Task, command: SignalTask, ctx: DecisionContext) -> Sequence[Event]:
    _not_terminal(task, "signal")
    if not ctx.actor.roles & SIGNAL_ROLES:
        raise NotPermitted(f"sending a signal needs one of the roles {sorted(SIGNAL_ROLES)}")
    if len(task.signals) >= MAX_PENDING_SIGNALS:
        raise InvalidTransition(
            f"task {task.id} already keeps {len(task.signals)} signals no wait has taken; "
            "send more once its workflow has consumed some"
        )
    return [TaskSignalled(at=ctx.now, name=command.name, payload=command.payload, by=ctx.actor.id)]


def _wait_for_signal(task: Task, command: WaitForSignal, ctx: DecisionContext) -> Sequence[Event]:
    """The earliest kept signal of the name is taken at once (the lease stays); with none, the wait
    starts and the lease is released."""
    _journal_position(task, command.worker_id, command.lease_id, command.index, ctx)
    kept = _first_signal(task, command.name)
    if kept is not None:
        return [
            SignalConsumed(
                at=ctx.now,
                index=command.index,
                name=command.name,
                number=kept.number,
                worker_id=command.worker_id,
                lease_id=command.lease_id,
            )
        ]
    until = None if command.timeout_seconds is None else ctx.now + timedelta(seconds=command.timeout_seconds)
    return [
        SignalWaitStarted(
            at=ctx.now,
            index=command.index,
            name=command.name,
            until=until,
            worker_id=command.worker_id,
            lease_id=command.lease_id,
        )
    ]


def _first_signal(task: Task, name: str) -> Signal | None:
    return next((signal for signal in task.signals if signal.name == name), None)


def _decide_approval(task: Task, command: DecideApproval, ctx: DecisionContext) -> Sequence[Event]:
    approval = task.approval(command.approval_id)
    if approval is None:
        raise NotFound(f"approval {command.approval_id} not found on task {task.id}")
    if approval.status != "pending":
        raise AlreadyDecided(f"approval {approval.id} is already {approval.status}")
    _not_terminal(task, "decide an approval of")
    if (refusal := why_cannot_vote(approval, ctx.actor)) is not None:
        raise NotPermitted(refusal)
    if any(vote.by == ctx.actor.id for vote in approval.decisions):
        raise AlreadyDecided(f"{ctx.actor.id} has already voted on approval {approval.id}")
    if command.decision == "reject" and not command.comment:
        raise InvalidCommand("a rejection needs a reason")
    vote = ApprovalVoteCast(
        at=ctx.now,
        approval_id=approval.id,
        by=ctx.actor.id,
        decision=command.decision,
        comment=command.comment,
        response=command.response,
    )
    approvals_after = sum(1 for v in approval.decisions if v.decision == "approve") + (command.decision == "approve")
    if command.decision == "reject":
        return [vote, ApprovalDecided(at=ctx.now, approval_id=approval.id, outcome="rejected")]
    if approvals_after >= approval.quorum:
        return [vote, ApprovalDecided(at=ctx.now, approval_id=approval.id, outcome="approved")]
    return [vote]


def why_cannot_vote(approval: Approval, actor: Actor) -> str | None:
    """Why ``actor`` may not vote on ``approval``, or None when it may (whether it already voted aside):
    the one rule the decider enforces and the console explains instead of showing a button."""
    if actor.id in (approval.requested_by, approval.requested_by_actor):
        return "the worker that requested an approval cannot decide it"
    if not actor.roles & APPROVER_ROLES:
        return "deciding an approval needs the approver or admin role"
    roles = {a.removeprefix("role:") for a in approval.approvers if a.startswith("role:")}
    named = {a for a in approval.approvers if not a.startswith("role:")}
    role_match = bool(roles & actor.roles) or ("admin" in actor.roles and bool(roles))
    if not (role_match or actor.id in named):
        return f"approval {approval.id} may be decided only by {list(approval.approvers)}"
    return None


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


# --- evolve ---------------------------------------------------------------------------------------


def evolve(state: TaskState, event: Event) -> TaskState:
    if isinstance(event, TaskSubmitted):
        return state if state is not None else _created(event)
    if state is None or state.is_terminal:
        return state
    if isinstance(event, TIMER_EVENTS) and event not in (timer.event for timer in timers(state)):
        return state
    task = state
    match event:
        case TaskClaimed():
            started = task.started_at or event.at
            deadline = task.deadline_at
            if deadline is None and task.timeout_seconds is not None:
                deadline = started + timedelta(seconds=task.timeout_seconds)
            return msgspec.structs.replace(
                _pinned(task, event.workflow_version),
                status="running",
                assigned_worker=event.worker_id,
                updated_at=event.at,
                lease=Lease(
                    event.lease_id,
                    event.worker_id,
                    event.lease_seconds,
                    event.lease_expires_at,
                    event.claimed_by,
                    claimed_at=event.at,
                ),
                started_at=started,
                deadline_at=deadline,
                not_before=None,
            )
        case TaskHeartbeat() if task.lease is not None and task.lease.id == event.lease_id:
            return msgspec.structs.replace(
                task,
                updated_at=event.at,
                progress=event.progress if event.progress is not None else task.progress,
                lease=msgspec.structs.replace(task.lease, expires_at=event.lease_expires_at),
            )
        case TaskLeaseExpired():
            return _lease_lost(task, event.at, event.lease_id, "lease expired")
        case TaskLeaseReleased() if _holds(task, event.lease_id):
            return _lease_lost(task, event.at, event.lease_id, event.reason)
        case ApprovalRequested():
            journal = task.journal
            if event.journal_index is not None and event.journal_index == len(journal):
                journal = (
                    *journal,
                    JournalEntry(event.journal_index, "approval", "approval", event.approval_id, event.at),
                )
            approval = Approval(
                id=event.approval_id,
                task_id=task.id,
                status="pending",
                reason=event.reason,
                requested_by=event.requested_by,
                requested_by_actor=event.requested_by_actor,
                approvers=event.approvers,
                quorum=event.quorum,
                decisions=(),
                created_at=event.at,
                expires_at=event.expires_at,
                decided_at=None,
                escalation=event.escalation,
                details=event.details,
                form=event.form,
                kind=event.kind,
            )
            return _released(
                task, event.at, status="awaiting_approval", approvals=(*task.approvals, approval), journal=journal
            )
        case ApprovalVoteCast():
            vote = ApprovalVote(
                by=event.by, decision=event.decision, comment=event.comment, at=event.at, response=event.response
            )
            return _with_approval(
                task, event.approval_id, event.at, lambda a: msgspec.structs.replace(a, decisions=(*a.decisions, vote))
            )
        case ApprovalDecided():
            return _approval_closed(task, event.approval_id, event.outcome, event.at)
        case ApprovalTimedOut():
            return _approval_closed(task, event.approval_id, "timed_out", event.at)
        case ApprovalEscalated():
            return _with_approval(
                task,
                event.approval_id,
                event.at,
                lambda a: (
                    a
                    if a.escalated
                    else msgspec.structs.replace(
                        a, escalated=True, approvers=tuple(dict.fromkeys((*a.approvers, *event.approvers)))
                    )
                ),
            )
        case TaskCompleted() if _holds(task, event.lease_id):
            return _released(task, event.at, status="completed", result=event.result, completed_at=event.at)
        case TaskRetryScheduled() if _holds(task, event.lease_id):
            return _released(
                task, event.at, status="pending", retries=event.attempt, error=event.error, not_before=event.not_before
            )
        case TaskRetryDue():
            return msgspec.structs.replace(task, not_before=None, updated_at=event.at)
        case TaskFailed() if _holds(task, event.lease_id):
            return _released(task, event.at, status="failed", error=event.error, completed_at=event.at)
        case TaskCancelled():
            return _released(
                task,
                event.at,
                status="cancelled",
                completed_at=event.at,
                cancellation_reason=event.reason,
                signal_wait=None,  # an ended task waits for nothing
            )
        case WorkflowOperationRecorded() if _holds(task, event.lease_id) and event.index == len(task.journal):
            entry = JournalEntry(event.index, event.kind, event.name, event.result, event.at)
            return msgspec.structs.replace(task, journal=(*task.journal, entry), updated_at=event.at)
        case PolicyDecided() if _holds(task, event.lease_id) and event.index == len(task.journal):
            decision = event.decision
            entry = JournalEntry(event.index, "policy", decision.entrypoint, msgspec.to_builtins(decision), event.at)
            return msgspec.structs.replace(task, journal=(*task.journal, entry), updated_at=event.at)
        case WorkflowSleepStarted() if _holds(task, event.lease_id) and event.index == len(task.journal):
            entry = JournalEntry(event.index, "sleep", "sleep", event.until.isoformat(), event.at)
            return _released(task, event.at, status="pending", journal=(*task.journal, entry), not_before=event.until)
        case WorkflowNonDeterministic() if _holds(task, event.lease_id):
            reason = f"non-deterministic at operation {event.index}"
            return _released(task, event.at, status="pending", parked=reason)
        case SecretRead() if _holds(task, event.lease_id) and event.name not in task.secret_pins:
            return msgspec.structs.replace(task, secret_pins={**task.secret_pins, event.name: event.version})
        case TaskResumed() if task.parked is not None:
            return msgspec.structs.replace(task, parked=None, updated_at=event.at)
        case TaskSignalled():
            return _signalled(task, event)
        case SignalConsumed() if _holds(task, event.lease_id) and event.index == len(task.journal):
            kept = _first_signal(task, event.name)
            if kept is None or kept.number != event.number:
                return task  # only the earliest kept signal of the name may be taken
            return msgspec.structs.replace(
                task,
                signals=tuple(s for s in task.signals if s.number != kept.number),
                journal=(*task.journal, JournalEntry(event.index, "signal", event.name, kept.delivered(), event.at)),
                updated_at=event.at,
            )
        case SignalWaitStarted() if _holds(task, event.lease_id) and event.index == len(task.journal):
            wait = SignalWait(index=event.index, name=event.name, since=event.at, until=event.until)
            return _released(task, event.at, status="pending", signal_wait=wait)
        case SignalWaitTimedOut() if task.signal_wait is not None and task.signal_wait.index == event.index:
            return _wait_ended(task, None, event.at)
        case TaskTimedOut():
            return _released(
                task,
                event.at,
                status="timed_out",
                completed_at=event.at,
                error={"reason": "task deadline passed", "deadline_at": event.deadline_at.isoformat()},
                signal_wait=None,
            )
    return task


def _created(event: TaskSubmitted) -> Task:
    task = Task(
        id=event.task_id,
        org=event.org,
        queue=event.queue,
        task_type=event.task_type,
        payload=event.payload,
        status="pending",
        priority=event.priority,
        required_capabilities=event.required_capabilities,
        metadata=event.metadata,
        retries=0,
        max_retries=event.max_retries,
        timeout_seconds=event.timeout_seconds,
        retry_backoff_seconds=event.retry_backoff_seconds,
        workflow=event.workflow,
        submitted_by=event.submitted_by,
        created_at=event.at,
        updated_at=event.at,
        policy=None if event.policy is None else PolicyPin(event.policy_version, event.policy.bundle_digest),
        environment=event.environment,
        excluded_workers=event.excluded_workers,
    )
    if event.policy is None or not event.policy.needs_approval:
        return task
    gate = Approval(
        id=f"{event.task_id}-1",
        task_id=event.task_id,
        status="pending",
        reason="; ".join(event.policy.reasons) or "the submit policy requires approval",
        requested_by=POLICY_GATE,
        requested_by_actor=event.submitted_by,  # who submitted a risky task cannot wave it through
        approvers=("role:approver",),
        quorum=1,
        decisions=(),
        created_at=event.at,
        expires_at=None,
        decided_at=None,
        escalation=None,
    )
    return msgspec.structs.replace(task, status="awaiting_approval", approvals=(gate,))


def _signalled(task: Task, event: TaskSignalled) -> Task:
    """A waiting workflow gets the signal of its name as the wait's result (kept signals of that name
    cannot exist then: the wait would have taken one); any other signal is kept for a later wait."""
    signal = Signal(task.signals_received + 1, event.name, event.payload, event.by, event.at)
    task = msgspec.structs.replace(task, signals_received=signal.number, updated_at=event.at)
    if task.signal_wait is not None and task.signal_wait.name == event.name:
        return _wait_ended(task, signal.delivered(), event.at)
    return msgspec.structs.replace(task, signals=(*task.signals, signal))


def _wait_ended(task: Task, result: dict[str, Any] | None, at: datetime) -> Task:
    """The wait's journal entry holds what it returns (a signal, or None when it timed out); the task
    may be claimed again, and the next claim's replay returns it."""
    wait = task.signal_wait
    assert wait is not None
    entry = JournalEntry(wait.index, "signal", wait.name, result, at)
    return msgspec.structs.replace(task, signal_wait=None, journal=(*task.journal, entry), updated_at=at)


def _holds(task: Task, lease_id: str) -> bool:
    return task.status == "running" and task.lease is not None and task.lease.id == lease_id


def _released(task: Task, at: datetime, **changes: Any) -> Task:
    return msgspec.structs.replace(task, lease=None, assigned_worker=None, updated_at=at, **changes)


def _lease_lost(task: Task, at: datetime, lease_id: str, reason: str) -> Task:
    """The holder of ``lease_id`` is gone, whether its lease ran out or its worker restarted: the attempt
    counts, so a task that keeps killing its workers still ends (``timed_out`` once retries run out)."""
    if task.retries < task.max_retries:
        return _released(
            task, at, status="pending", retries=task.retries + 1, error={"reason": reason, "lease_id": lease_id}
        )
    return _released(
        task,
        at,
        status="timed_out",
        completed_at=at,
        error={"reason": f"{reason} and retries are exhausted", "lease_id": lease_id},
    )


def _with_approval(task: Task, approval_id: str, at: datetime, change: Any) -> Task:
    approval = task.approval(approval_id)
    if approval is None or approval.status != "pending":
        return task
    approvals = tuple(change(a) if a.id == approval_id else a for a in task.approvals)
    return msgspec.structs.replace(task, approvals=approvals, updated_at=at)


def _approval_closed(task: Task, approval_id: str, status: str, at: datetime) -> Task:
    closed = _with_approval(task, approval_id, at, lambda a: msgspec.structs.replace(a, status=status, decided_at=at))
    if closed is task:
        return task
    gate = closed.approval(approval_id)
    if gate is not None and gate.requested_by == POLICY_GATE and status != "approved":
        reason = f"the approval the submit policy required was {status}"
        return _released(closed, at, status="cancelled", completed_at=at, cancellation_reason=reason)
    waiting = task.status == "awaiting_approval" and not any(a.status == "pending" for a in closed.approvals)
    return msgspec.structs.replace(closed, status="pending") if waiting else closed


# --- timers ---------------------------------------------------------------------------------------


def timers(state: TaskState) -> Sequence[Timer]:
    if state is None or state.is_terminal:
        return ()
    task = state
    wanted: list[Timer] = []
    if task.status == "running" and task.lease is not None:
        wanted.append(
            Timer(f"lease-{task.lease.id}", TaskLeaseExpired(at=task.lease.expires_at, lease_id=task.lease.id))
        )
    if task.status == "pending" and task.not_before is not None:
        wanted.append(Timer(f"retry-{task.retries}", TaskRetryDue(at=task.not_before, attempt=task.retries)))
    for approval in task.approvals:
        if approval.status != "pending":
            continue
        if approval.expires_at is not None:
            wanted.append(
                Timer(
                    f"approval-{approval.id}-timeout", ApprovalTimedOut(at=approval.expires_at, approval_id=approval.id)
                )
            )
        if approval.escalation is not None and not approval.escalated:
            due = approval.created_at + timedelta(seconds=approval.escalation.after_seconds)
            wanted.append(
                Timer(
                    f"approval-{approval.id}-escalation",
                    ApprovalEscalated(at=due, approval_id=approval.id, approvers=approval.escalation.approvers),
                )
            )
    wait = task.signal_wait
    if wait is not None and wait.until is not None:
        wanted.append(Timer(f"signal-wait-{wait.index}", SignalWaitTimedOut(at=wait.until, index=wait.index)))
    if task.deadline_at is not None:
        wanted.append(Timer("deadline", TaskTimedOut(at=task.deadline_at, deadline_at=task.deadline_at)))
    return wanted


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
