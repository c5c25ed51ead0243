"""The API's objects as msgspec Structs. Decoding ignores fields these do not name, so a server that adds
fields (the contract lets it) never breaks an older client; fields the contract allows to be absent or
null default to None."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import msgspec

TaskStatus = Literal["pending", "running", "awaiting_approval", "completed", "failed", "cancelled", "timed_out"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "timed_out"})

T = TypeVar("T")


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """``id`` is shown only to the credential that claimed the task (null for everyone else)."""

    id: str | None
    expires_at: datetime


class ApprovalDecision(msgspec.Struct, frozen=True, kw_only=True):
    by: str
    decision: Literal["approve", "reject"]
    comment: str | None = None
    response: Any = None
    """The structured answer, fitting the approval's ``form`` when it has one."""
    at: datetime


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    task_id: str
    status: Literal["pending", "approved", "rejected", "timed_out"]
    reason: str
    details: Any = None
    """What is being approved (a plan, a diff, a tool call): any JSON the requester attached."""
    form: dict[str, Any] | None = None
    """A JSON Schema each decision's ``response`` must satisfy."""
    requested_by: str | None = None
    approvers: list[str] = []
    quorum: int = 1
    decisions: list[ApprovalDecision] = []
    created_at: datetime
    expires_at: datetime | None = None
    decided_at: datetime | None = None
    seq: int | None = None


class Task(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    org: str
    queue: str
    type: str
    payload: Any = None
    status: TaskStatus
    priority: Literal["critical", "high", "normal", "low"]
    required_capabilities: list[str] = []
    metadata: dict[str, Any] = {}
    retries: int = 0
    max_retries: int = 0
    timeout_seconds: float | None = None
    assigned_worker: str | None = None
    lease: Lease | None = None
    result: Any = None
    error: Any = None
    approvals: list[Approval] = []
    parked: str | None = None
    """Why a workflow task stopped until someone resumes it (a non-deterministic replay), if it did."""
    created_at: datetime
    updated_at: datetime | None = None
    completed_at: datetime | None = None
    seq: int
    """The stream sequence of the task's last event when this was read."""

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class LlmSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the org wants this worker's model calls made (null: the workflow's own choice)."""

    api_base: str | None = None
    model_override: str | None = None
    fallbacks: list[str] | None = None


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the org set for a worker, given at registration: its queue's environment's settings over
    the org's (null: not set, keep your own), and the policy bundle version new submissions are
    decided by (null: the shipped policies)."""

    environment: str | None = None
    heartbeat_interval_seconds: float | None = None
    lease_seconds: float | None = None
    llm: LlmSettings = LlmSettings()
    policy_bundle_version: int | None = None
    policy_bundle_digest: str | None = None


class Worker(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    queue: str
    capabilities: list[str] = []
    labels: dict[str, str] = {}
    status: Literal["starting", "ready", "busy", "draining", "offline", "failed"]
    last_heartbeat_at: datetime | None = None
    tasks_completed: int = 0
    seq: int | None = None
    config: WorkerConfig | None = None
    """Set in the answer to a registration (``workers.register``): what the worker is to apply."""


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed task, its lease and the worker that holds it: what the worker hands back to renew the
    lease, complete or fail the task, or ask for an approval."""

    task: Task
    lease: Lease
    worker_id: str


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One message of an event stream: ``id`` is the event's stream sequence (what ``Last-Event-ID``
    and ``after`` name), ``type`` its event type, ``data`` the event as JSON."""

    id: int
    type: str
    data: dict[str, Any]

    @property
    def seq(self) -> int:
        return self.id


class Page(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    items: list[T]
    next_cursor: str | None = None


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    """A 202: the command is in the log at ``seq``."""

    seq: int
