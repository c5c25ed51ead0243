"""Commands: what a client asks for. Field constraints live on the types, so the same definitions
validate HTTP input and runner/NATS requests. Ids of new things (task, lease, approval) are chosen by
the caller and passed in, which keeps the deciders pure."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from core.events import (
    ApprovalKind,
    Escalation,
    PolicyDecision,
    Priority,
    ScheduleOverlap,
    ScheduleRunOutcome,
    Vote,
    WorkflowRef,
)
from core.ids import TOKEN_PATTERN, Token, whole

Capability = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Capabilities = Annotated[tuple[Capability, ...], msgspec.Meta(max_length=64)]
ExcludedWorkers = Annotated[tuple[Token, ...], msgspec.Meta(max_length=64)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=366 * 24 * 3600)]
LeaseSeconds = Annotated[float, msgspec.Meta(ge=1, le=24 * 3600)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]
Approver = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Actor(msgspec.Struct, frozen=True):
    """Who issues a command: a credential's identity and roles, never taken from a request body."""

    id: str
    roles: frozenset[str] = frozenset()


SYSTEM = Actor(id="system", roles=frozenset({"admin"}))


class Command(msgspec.Struct, frozen=True, kw_only=True):
    pass


class TaskCommand(Command, frozen=True, kw_only=True):
    task_id: Token


class SubmitTask(TaskCommand, frozen=True, kw_only=True):
    task_type: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    payload: Any = None
    queue: Token = "default"
    priority: Priority = "normal"
    required_capabilities: Capabilities = ()
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    timeout_seconds: Seconds | None = None
    retry_backoff_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 1.0
    metadata: dict[str, Any] = {}
    workflow: WorkflowRef | None = None
    policy: PolicyDecision | None = None
    """What the submit policy decided about this task (the gateway asks it): a denial is recorded
    instead of the task, an approval requirement makes the task wait for humans first."""
    policy_version: int | None = None
    """The org's policy bundle version that decided it (None: the shipped policies)."""
    environment: Token | None = None
    """The environment of the queue, as the server's environments say (never the submitter)."""
    excluded_workers: ExcludedWorkers = ()
    """Worker ids never offered this task."""


class ClaimTask(TaskCommand, frozen=True, kw_only=True):
    """Take a pending task. The lease is bound to the claiming actor (the credential, from the command's
    context, never from a field): heartbeat, approval requests, operations, sleep, non-determinism
    reports, complete and fail are refused from any other actor, admins included."""

    worker_id: Token
    lease_id: Token
    queue: Token = "default"
    capabilities: Capabilities = ()
    lease_seconds: LeaseSeconds = 30


class HeartbeatTask(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    lease_seconds: LeaseSeconds | None = None
    progress: Any = None


class RequestApproval(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    approval_id: Token
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    approvers: Annotated[tuple[Approver, ...], msgspec.Meta(min_length=1, max_length=64)] = ("role:approver",)
    quorum: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    timeout_seconds: Seconds | None = None
    escalation: Escalation | None = None
    journal_index: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None
    details: Any = None
    """What is being approved (any JSON); the gateway bounds its size."""
    form: dict[str, Any] | None = None
    """A JSON Schema the decisions' responses must satisfy; the gateway checks it is one."""
    kind: ApprovalKind = "approval"
    """``question``: a workflow asks a human something and takes the response as the answer."""


class DecideApproval(TaskCommand, frozen=True, kw_only=True):
    approval_id: Token
    decision: Vote
    comment: ShortText | None = None
    response: Any = None
    """The structured answer; the gateway has checked it against the approval's form."""


class CompleteTask(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    result: Any = None


class FailTask(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    error: Any = None
    retryable: bool = True


class CancelTask(TaskCommand, frozen=True, kw_only=True):
    reason: ShortText | None = None


JournalIndex = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
OperationKind = Annotated[str, msgspec.Meta(pattern=whole("step|llm|policy|now|uuid"))]


class RecordOperation(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    index: JournalIndex
    kind: OperationKind
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    result: Any = None


class StartSleep(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    index: JournalIndex
    seconds: Annotated[float, msgspec.Meta(ge=0, le=366 * 24 * 3600)]


class ReportNonDeterminism(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    index: JournalIndex
    expected: Any = None
    actual: Any = None


class ResumeTask(TaskCommand, frozen=True, kw_only=True):
    pass


SignalName = Annotated[
    str, msgspec.Meta(pattern=TOKEN_PATTERN, description="signal name: lowercase token [a-z0-9][a-z0-9_-]{0,62}")
]


class SignalTask(TaskCommand, frozen=True, kw_only=True):
    """Send the task's workflow the signal ``name`` (admin, submitter or approver): delivered once, in
    the order sent, to the first wait for that name."""

    name: SignalName
    payload: Any = {}


class WaitForSignal(TaskCommand, frozen=True, kw_only=True):
    """The workflow waits for a signal ``name`` at journal position ``index``: the earliest kept one of
    that name is taken at once, else the lease is released until one arrives or ``timeout_seconds``
    pass."""

    worker_id: Token
    lease_id: Token
    index: JournalIndex
    name: SignalName
    timeout_seconds: Annotated[float, msgspec.Meta(ge=0, le=366 * 24 * 3600)] | None = None


class WorkerCommand(Command, frozen=True, kw_only=True):
    worker_id: Token


class RegisterWorker(WorkerCommand, frozen=True, kw_only=True):
    queue: Token = "default"
    capabilities: Capabilities = ()
    labels: Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=64)] = {}
    model: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    provider: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    heartbeat_timeout_seconds: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0


class HeartbeatWorker(WorkerCommand, frozen=True, kw_only=True):
    status: Annotated[str, msgspec.Meta(pattern=whole("ready|busy|draining"))] = "ready"


class ReportWorkerFailure(WorkerCommand, frozen=True, kw_only=True):
    reason: ShortText


class DeregisterWorker(WorkerCommand, frozen=True, kw_only=True):
    pass


class RecordWorkerAttempt(WorkerCommand, frozen=True, kw_only=True):
    """The gateway tells the worker how an attempt of its ended (from the task's events): a
    non-retryable failure or an expired lease counts toward its circuit breaker; a success resets it."""

    task_id: Token
    outcome: Annotated[str, msgspec.Meta(pattern=whole("succeeded|failed|lease_expired"))]


class ResetWorkerBreaker(WorkerCommand, frozen=True, kw_only=True):
    """An admin closes the worker's open circuit breaker before its cool-down ends."""


ROLES = frozenset({"admin", "submitter", "worker", "approver", "viewer"})
Role = Annotated[str, msgspec.Meta(pattern=whole("|".join(sorted(ROLES))))]


class CreateOrg(Command, frozen=True, kw_only=True):
    org: Token
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class CreateApiKey(Command, frozen=True, kw_only=True):
    key_id: Token
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    roles: Annotated[tuple[Role, ...], msgspec.Meta(min_length=1, max_length=5)]
    secret_sha256: Annotated[str, msgspec.Meta(pattern=whole("[0-9a-f]{64}"))]


class RevokeApiKey(Command, frozen=True, kw_only=True):
    key_id: Token


class PushPolicyBundle(Command, frozen=True, kw_only=True):
    """Record a new version of the org's policy bundle. The caller has loaded (compiled) it and
    computed its digest: the decider only keeps versions in order."""

    digest: Annotated[str, msgspec.Meta(pattern=whole("sha256:[0-9a-f]{64}"))]
    modules: dict[str, str]
    data: dict[str, Any] = {}
    wasm: bytes | None = None
    revision: Annotated[str, msgspec.Meta(max_length=256)] = ""
    entrypoints: tuple[str, ...] = ()


EnvironmentName = Annotated[
    str, msgspec.Meta(pattern=TOKEN_PATTERN, description="lowercase name [a-z0-9][a-z0-9_-]{0,62}")
]
LabelKey = Annotated[
    str,
    msgspec.Meta(pattern=whole(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}"), description="[A-Za-z0-9][A-Za-z0-9._/-]{0,127}"),
]
Labels = Annotated[dict[LabelKey, Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=64)]
MAX_ENVIRONMENT_QUEUES = 100
EnvironmentQueues = Annotated[tuple[Token, ...], msgspec.Meta(max_length=MAX_ENVIRONMENT_QUEUES)]


class DefineEnvironment(Command, frozen=True, kw_only=True):
    """Create the org's environment ``name`` holding ``queues`` (its first queue is where a submit that
    names the environment instead of a queue goes), or, with ``replace``, create or replace it whole.
    A queue belongs to at most one environment of the org."""

    name: EnvironmentName
    queues: EnvironmentQueues = ()
    labels: Labels = {}
    replace: bool = False


class DeleteEnvironment(Command, frozen=True, kw_only=True):
    name: EnvironmentName


CronExpression = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        description="5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first",
    ),
]
TimeZoneName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, description="an IANA time zone, e.g. UTC")]


class ScheduleCommand(Command, frozen=True, kw_only=True):
    schedule_id: Token


class CreateSchedule(ScheduleCommand, frozen=True, kw_only=True):
    """Submit ``task`` (a submit body, checked by the gateway) at each time ``cron`` names in
    ``timezone``; ``overlap`` says what a fire does while the previous run is still open."""

    cron: CronExpression
    timezone: TimeZoneName = "UTC"
    task: dict[str, Any]
    overlap: ScheduleOverlap = "skip"
    paused: bool = False


class PauseSchedule(ScheduleCommand, frozen=True, kw_only=True):
    pass


class ResumeSchedule(ScheduleCommand, frozen=True, kw_only=True):
    pass


class DeleteSchedule(ScheduleCommand, frozen=True, kw_only=True):
    pass


class RecordScheduleRun(ScheduleCommand, frozen=True, kw_only=True):
    """What the run of the fire at ``fire_at`` did (the scheduler or a trigger ran it: the submit goes
    through the gateway's submit path, so it cannot happen inside a decider)."""

    fire_at: datetime
    task_id: Token | None
    outcome: ScheduleRunOutcome
    reason: ShortText | None = None
    cancelled_task_id: Token | None = None
    manual: bool = False
