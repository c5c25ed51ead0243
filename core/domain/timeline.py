"""A task's timeline: each event of its history as one line a person reads (``summarize``), with who
recorded it, when, and whether it changed anything (``task_timeline``: what ``controlplane history`` and
the console's run page show). Pure: callers read :class:`RecordedEvent` lists from the log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from core.domain.events import (
    AnyEvent,
    ApiKeyCreated,
    ApiKeyRevoked,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    ApprovalTimedOut,
    ApprovalVoteCast,
    DecidingVote,
    OrgCreated,
    PolicyBundlePushed,
    PolicyDecided,
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
    TaskSubmissionDenied,
    TaskSubmitted,
    TaskTimedOut,
    WorkerDeregistered,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerHeartbeatMissed,
    WorkerRegistered,
    WorkflowNonDeterministic,
    WorkflowOperationRecorded,
    WorkflowSleepStarted,
)
from core.domain.records import RecordedEvent, rfc3339
from core.domain.task import TaskState
from core.domain.task_decider import TASK

SHORT = 80

_json = msgspec.json.Encoder(order="sorted").encode


def short(value: Any, limit: int = SHORT) -> str:
    """Compact JSON of ``value``, cut to ``limit`` characters."""
    text = _json(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(event: AnyEvent) -> str:
    """One line saying what the event means."""
    match event:
        case TaskSubmitted():
            workflow = "" if event.workflow is None else f", workflow {_workflow_name(event.workflow)}"
            forked = event.metadata.get("forked_from")
            origin = f", forked from {short(forked)}" if forked is not None else ""
            return f"submitted {event.task_type!r} to queue {event.queue} ({event.priority}{workflow}){origin}"
        case TaskSubmissionDenied():
            return (
                f"submission of {event.task_type!r} to queue {event.queue} by {event.submitted_by} denied by "
                f"{event.decision.entrypoint}: {short(event.decision.value, 50)}"
            )
        case TaskClaimed():
            return (
                f"claimed by {event.worker_id} (attempt {event.attempt}, lease {event.lease_id} "
                f"for {event.lease_seconds:g} s)"
            )
        case TaskHeartbeat():
            progress = "" if event.progress is None else f", progress {short(event.progress, 40)}"
            return f"heartbeat from {event.worker_id}, lease until {rfc3339(event.lease_expires_at)}{progress}"
        case TaskLeaseExpired():
            return f"lease {event.lease_id} expired"
        case TaskLeaseReleased():
            return f"lease {event.lease_id} of {event.worker_id} released: {event.reason}"
        case ApprovalRequested():
            position = "" if event.journal_index is None else f" at operation {event.journal_index}"
            return (
                f"approval {event.approval_id} requested by {event.requested_by}{position}: {event.reason!r} "
                f"(quorum {event.quorum} of {', '.join(event.approvers)})"
            )
        case ApprovalVoteCast():
            return _vote(event, event.approval_id)
        case ApprovalDecided(vote=DecidingVote() as deciding):
            return f"{_vote(deciding, event.approval_id)}: approval {event.outcome}"
        case ApprovalDecided():
            return f"approval {event.approval_id} {event.outcome}"
        case ApprovalTimedOut():
            return f"approval {event.approval_id} timed out"
        case ApprovalEscalated():
            return f"approval {event.approval_id} escalated to {', '.join(event.approvers)}"
        case TaskCompleted():
            return f"completed by {event.worker_id}: {short(event.result)}"
        case TaskRetryScheduled():
            return f"attempt {event.attempt} failed: {short(event.error, 50)}; retry after {rfc3339(event.not_before)}"
        case TaskRetryDue():
            return f"backoff of attempt {event.attempt} over"
        case TaskFailed():
            return f"failed: {short(event.error)}"
        case TaskCancelled():
            return f"cancelled by {event.by}" + ("" if event.reason is None else f": {event.reason!r}")
        case TaskTimedOut():
            return f"timed out: deadline {rfc3339(event.deadline_at)} passed"
        case WorkflowOperationRecorded():
            return f"operation {event.index}: {event.kind} {event.name!r} -> {short(event.result, 50)}"
        case PolicyDecided():
            return f"operation {event.index}: policy {event.decision.entrypoint} -> {short(event.decision.value, 50)}"
        case WorkflowSleepStarted():
            return f"operation {event.index}: sleep until {rfc3339(event.until)}"
        case WorkflowNonDeterministic():
            return (
                f"non-determinism at operation {event.index}: journal holds {short(event.expected, 40)}, "
                f"code asked for {short(event.actual, 40)}; parked"
            )
        case TaskResumed():
            return f"resumed by {event.by}"
        case TaskSignalled():
            return f"signal {event.name!r} from {event.by}: {short(event.payload, 50)}"
        case SignalWaitStarted():
            limit = "" if event.until is None else f" until {rfc3339(event.until)}"
            return f"operation {event.index}: wait for signal {event.name!r}{limit}"
        case SignalConsumed():
            return f"operation {event.index}: took signal {event.name!r} (number {event.number})"
        case SignalWaitTimedOut():
            return f"operation {event.index}: no signal came in time"
        case SecretRead():
            return f"secret {event.name!r} version {event.version} read by {event.read_by} (worker {event.worker_id})"
        case WorkerRegistered():
            restart = ", a new process: its leases are released" if event.restarted else ""
            return f"worker {event.worker_id} registered on queue {event.queue}{restart}"
        case WorkerHeartbeat():
            return f"worker heartbeat: {event.status}"
        case WorkerHeartbeatMissed():
            return "worker missed its heartbeats: offline"
        case WorkerFailed():
            return f"worker failed: {event.reason}"
        case WorkerDeregistered():
            return "worker deregistered"
        case OrgCreated():
            return f"org {event.org} created by {event.created_by}"
        case ApiKeyCreated():
            return f"api key {event.key_id} ({', '.join(event.roles)}) created by {event.created_by}"
        case ApiKeyRevoked():
            return f"api key {event.key_id} revoked by {event.revoked_by}"
        case PolicyBundlePushed():
            return f"policy bundle version {event.version} ({event.digest}) pushed by {event.pushed_by}"
    return type(event).__name__


def _vote(vote: ApprovalVoteCast | DecidingVote, approval_id: str) -> str:
    comment = "" if vote.comment is None else f": {vote.comment!r}"
    response = "" if vote.response is None else f", response {short(vote.response, 40)}"
    return f"{vote.by} voted {vote.decision} on {approval_id}{comment}{response}"


def _workflow_name(ref: Any) -> str:
    return ref.name if ref.version is None else f"{ref.name}@v{ref.version}"


class TimelineEntry(msgspec.Struct, frozen=True):
    seq: int
    time: str
    actor: str | None
    type: str
    summary: str
    changed: bool
    """False for an event whose fold changed nothing: a timer that fired after its guarded thing had
    moved on, or a duplicate."""
    event: AnyEvent
    command_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None


def task_timeline(history: Sequence[RecordedEvent]) -> list[TimelineEntry]:
    entries = []
    state: TaskState = None
    for item in history:
        after = TASK.evolve(state, item.event)
        entries.append(
            TimelineEntry(
                seq=item.seq,
                time=rfc3339(item.recorded_at),
                actor=item.actor,
                type=type(item.event).__name__,
                summary=summarize(item.event),
                changed=after is not state,
                event=item.event,
                command_id=item.command_id,
                correlation_id=item.correlation_id,
                causation_id=item.causation_id,
            )
        )
        state = after
    return entries
