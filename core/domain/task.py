"""The task aggregate: the unit of work and the workflow instance. Its state, its fold (``evolve``) and the
timers it wants. What each command may do to it (submit, claim, lease, complete, fail and retry, cancel,
deadline, the workflow journal) is ``core.domain.task_decider``'s; the rules of its approvals are
``core.domain.approvals``', of its signals ``core.domain.signals``'. Pure: no I/O, no clock, no ids."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from core.domain.approvals import (
    POLICY_GATE,
    Approval,
    approval_timers,
    closed,
    escalated,
    opened,
    policy_gate,
    voted,
)
from core.domain.decider import Timer
from core.domain.events import (
    TERMINAL_STATUSES,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    ApprovalTimedOut,
    ApprovalVoteCast,
    DecidingVote,
    Event,
    PolicyDecided,
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
    TaskSubmitted,
    TaskTimedOut,
    WorkflowNonDeterministic,
    WorkflowOperationRecorded,
    WorkflowRef,
    WorkflowSleepStarted,
)
from core.domain.signals import Signal, SignalWait, first_signal, wait_timer

MAX_BACKOFF = timedelta(minutes=10)
TIMER_EVENTS = (
    TaskLeaseExpired,
    TaskRetryDue,
    TaskTimedOut,
    ApprovalTimedOut,
    ApprovalEscalated,
    SignalWaitTimedOut,
)


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


class JournalEntry(msgspec.Struct, frozen=True):
    """One durable operation of a workflow, in order: what a replay answers from."""

    index: int
    kind: str
    name: str
    result: Any
    at: datetime


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
            approvals = (*task.approvals, opened(task.id, event))
            return _released(task, event.at, status="awaiting_approval", approvals=approvals, journal=journal)
        case ApprovalVoteCast():
            return _with_approval(task, event.approval_id, event.at, lambda a: voted(a, event, event.at))
        case ApprovalDecided(vote=DecidingVote() as deciding):
            with_vote = _with_approval(task, event.approval_id, event.at, lambda a: voted(a, deciding, event.at))
            return _approval_closed(with_vote, event.approval_id, event.outcome, event.at)
        case ApprovalDecided():
            return _approval_closed(task, event.approval_id, event.outcome, event.at)
        case ApprovalTimedOut():
            return _approval_closed(task, event.approval_id, "timed_out", event.at)
        case ApprovalEscalated():
            return _with_approval(task, event.approval_id, event.at, lambda a: escalated(a, event))
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
            kept = first_signal(task.signals, event.name)
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
    return msgspec.structs.replace(task, status="awaiting_approval", approvals=(policy_gate(event),))


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


def _with_approval(task: Task, approval_id: str, at: datetime, change: Callable[[Approval], Approval]) -> Task:
    approval = task.approval(approval_id)
    if approval is None or approval.status != "pending":
        return task
    approvals = tuple(change(a) if a.id == approval_id else a for a in task.approvals)
    return msgspec.structs.replace(task, approvals=approvals, updated_at=at)


def _approval_closed(task: Task, approval_id: str, status: str, at: datetime) -> Task:
    after = _with_approval(task, approval_id, at, lambda a: closed(a, status, at))
    if after is task:
        return task
    gate = after.approval(approval_id)
    if gate is not None and gate.requested_by == POLICY_GATE and status != "approved":
        reason = f"the approval the submit policy required was {status}"
        return _released(after, at, status="cancelled", completed_at=at, cancellation_reason=reason)
    waiting = task.status == "awaiting_approval" and not any(a.status == "pending" for a in after.approvals)
    return msgspec.structs.replace(after, status="pending") if waiting else after


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
        wanted.extend(approval_timers(approval))
    wanted.extend(wait_timer(task.signal_wait))
    if task.deadline_at is not None:
        wanted.append(Timer("deadline", TaskTimedOut(at=task.deadline_at, deadline_at=task.deadline_at)))
    return wanted
