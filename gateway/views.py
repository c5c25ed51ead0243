"""The public objects of docs/api.md, rendered from folded aggregate state."""

from __future__ import annotations

from typing import Any

from core.domain.approvals import Approval
from core.domain.task import Lease, Task
from core.domain.worker import Worker


def approval_document(approval: Approval) -> dict[str, Any]:
    return {
        "id": approval.id,
        "task_id": approval.task_id,
        "status": approval.status,
        "reason": approval.reason,
        "details": approval.details,
        "form": approval.form,
        "requested_by": approval.requested_by,
        "approvers": list(approval.approvers),
        "quorum": approval.quorum,
        "decisions": [
            {"by": v.by, "decision": v.decision, "comment": v.comment, "response": v.response, "at": v.at}
            for v in approval.decisions
        ],
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "decided_at": approval.decided_at,
        "escalation": None
        if approval.escalation is None
        else {"after_seconds": approval.escalation.after_seconds, "approvers": list(approval.escalation.approvers)},
        "escalated": approval.escalated,
        "kind": approval.kind,
    }


def task_document(task: Task, seq: int, *, viewer: str | None = None) -> dict[str, Any]:
    """``viewer`` is the actor id of the credential that asks; the gateway always passes it. Only the
    holder of the task's lease sees the lease's id (see :func:`lease_document`). Without a viewer (an
    operator's tool, which reads the log itself) everything is shown."""
    return {
        "id": task.id,
        "org": task.org,
        "queue": task.queue,
        "environment": task.environment,
        "type": task.task_type,
        "payload": task.payload,
        "status": task.status,
        "priority": task.priority,
        "required_capabilities": list(task.required_capabilities),
        "metadata": task.metadata,
        "retries": task.retries,
        "max_retries": task.max_retries,
        "timeout_seconds": task.timeout_seconds,
        "retry_backoff_seconds": task.retry_backoff_seconds,
        "workflow": None if task.workflow is None else {"name": task.workflow.name, "version": task.workflow.version},
        "assigned_worker": task.assigned_worker,
        "lease": None if task.lease is None else lease_document(task.lease, viewer),
        "result": task.result,
        "error": task.error,
        "progress": task.progress,
        "cancellation_reason": task.cancellation_reason,
        "approvals": [approval_document(a) for a in task.approvals],
        "journal": [
            {"index": e.index, "kind": e.kind, "name": e.name, "result": e.result, "at": e.at} for e in task.journal
        ],
        "parked": task.parked,
        "signals": [signal.delivered() for signal in task.signals],
        "signal_wait": None
        if task.signal_wait is None
        else {
            "index": task.signal_wait.index,
            "name": task.signal_wait.name,
            "since": task.signal_wait.since,
            "until": task.signal_wait.until,
        },
        "policy": None if task.policy is None else {"version": task.policy.version, "digest": task.policy.digest},
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "started_at": task.started_at,
        "completed_at": task.completed_at,
        "not_before": task.not_before,
        "deadline_at": task.deadline_at,
        "excluded_workers": list(task.excluded_workers),
        "seq": seq,
    }


def lease_document(lease: Lease, viewer: str | None) -> dict[str, Any]:
    """``{id, expires_at}``, with ``id`` null for anyone but the credential that claimed: nobody else
    can use the lease (the decider refuses them), so nobody else needs its id. The shape stays the same
    for every reader."""
    shown = viewer is None or (lease.holder is not None and lease.holder == viewer)
    return {"id": lease.id if shown else None, "expires_at": lease.expires_at}


def worker_document(worker: Worker, tasks_completed: int, seq: int) -> dict[str, Any]:
    return {
        "id": worker.id,
        "queue": worker.queue,
        "capabilities": list(worker.capabilities),
        "labels": worker.labels,
        "model": worker.model,
        "provider": worker.provider,
        "status": worker.status,
        "registered_at": worker.registered_at,
        "last_heartbeat_at": worker.last_heartbeat_at,
        "heartbeat_timeout_seconds": worker.heartbeat_timeout_seconds,
        "tasks_completed": tasks_completed,
        "failure_reason": worker.failure_reason,
        "breaker": {"failures": worker.consecutive_failures, "open_until": worker.breaker_open_until},
        "seq": seq,
    }
