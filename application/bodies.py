"""Request bodies of docs/api.md. A field a body shares with the command it becomes has the command's
own type (core.domain.commands), so HTTP input and commands share one schema per field
(tests/unit/test_schemas_agree.py holds each pair to it); only what HTTP alone takes is declared here.
Unknown fields are ignored so clients can evolve first."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from core.domain.commands import (
    DEFAULT_BREAKER_COOLDOWN_SECONDS,
    DEFAULT_BREAKER_FAILURES,
    Approvers,
    BreakerCooldown,
    BreakerFailures,
    Capabilities,
    ChannelName,
    ChannelUrl,
    ClaimStrategyName,
    CronExpression,
    Details,
    EnvironmentName,
    EnvironmentQueues,
    ExcludedWorkers,
    Form,
    HeartbeatInterval,
    JournalIndex,
    Labels,
    LeaseSeconds,
    LlmConfig,
    MaxRetries,
    Metadata,
    Name,
    OneLine,
    OperationKind,
    PolicyModules,
    Quorum,
    Reason,
    ReportedWorkerStatus,
    Response,
    RetryBackoff,
    Revision,
    Roles,
    Seconds,
    ShortText,
    SignalName,
    SignalPayload,
    SmtpSpec,
    TimeZoneName,
    Triggers,
    WaitSeconds,
)
from core.domain.events import ApprovalKind, ChannelKind, Escalation, Priority, ScheduleOverlap
from core.domain.ids import Token


class WorkflowBody(msgspec.Struct, frozen=True):
    name: Name
    version: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None


class SubmitTaskBody(msgspec.Struct, frozen=True):
    type: Name
    payload: Any = None
    queue: Token | None = None
    """None: the first queue of ``environment`` when that is given, else "default"."""
    environment: Token | None = None
    """Route to this environment's first queue; with ``queue`` too, the queue must be the environment's."""
    required_capabilities: Capabilities = ()
    priority: Priority = "normal"
    max_retries: MaxRetries = 3
    timeout_seconds: Seconds | None = None
    retry_backoff_seconds: RetryBackoff = 1.0
    metadata: Metadata = {}
    workflow: WorkflowBody | None = None
    excluded_workers: ExcludedWorkers = ()
    """Worker ids never offered this task (at most 64)."""


class ClaimBody(msgspec.Struct, frozen=True):
    worker_id: Token
    queue: Token = "default"
    capabilities: Capabilities = ()
    block_ms: Annotated[int, msgspec.Meta(ge=0, le=30_000)] = 0
    lease_seconds: LeaseSeconds = 30
    workflows_only: bool = False
    """Only tasks that run a workflow (runners ask this): a task without one, even one any worker's
    capabilities would match, is left for the workers that do such tasks by hand."""


class ClaimBatchBody(ClaimBody, frozen=True):
    max_tasks: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


class LeaseBody(msgspec.Struct, frozen=True):
    worker_id: Token
    lease_id: Token


class SecretReadBody(LeaseBody, frozen=True):
    """Read a secret for the task whose lease the caller holds."""


MAX_SECRET_CHARS = 65_536
SecretValue = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_SECRET_CHARS, description="the value; write-only, ≤ 64 Ki chars")
]


class SecretBody(msgspec.Struct, frozen=True):
    value: SecretValue
    environment: EnvironmentName | None = None
    """Readable only by tasks of this environment (which then read it instead of the org-wide one)."""


class WorkerConfigBody(msgspec.Struct, frozen=True):
    heartbeat_interval_seconds: HeartbeatInterval | None = None
    lease_seconds: LeaseSeconds | None = None
    llm: LlmConfig = LlmConfig()


class HeartbeatBody(LeaseBody, frozen=True):
    lease_seconds: LeaseSeconds | None = None
    progress: Any = None


class ApprovalRequestBody(LeaseBody, frozen=True):
    reason: Annotated[Reason, msgspec.Meta(description="what the human is approving")]
    approvers: Approvers = ("role:approver",)
    quorum: Quorum = 1
    timeout_seconds: Seconds | None = None
    escalation: Escalation | None = None
    journal_index: JournalIndex | None = None
    details: Details = None
    form: Form | None = None
    kind: ApprovalKind = "approval"
    """``question``: the workflow asks a human something (``ctx.ask``); the console labels it so."""


class OperationBody(LeaseBody, frozen=True):
    index: JournalIndex
    kind: OperationKind
    name: Name
    result: Any = None


class SleepBody(LeaseBody, frozen=True):
    index: JournalIndex
    seconds: WaitSeconds


class SignalWaitBody(LeaseBody, frozen=True):
    index: JournalIndex
    name: SignalName
    timeout_seconds: WaitSeconds | None = None


class SignalBody(msgspec.Struct, frozen=True):
    name: SignalName
    payload: SignalPayload = {}


class NonDeterminismBody(LeaseBody, frozen=True):
    index: JournalIndex
    expected: Any = None
    actual: Any = None


class NoBody(msgspec.Struct, frozen=True):
    pass


class CompleteBody(LeaseBody, frozen=True):
    result: Any = None


class FailBody(LeaseBody, frozen=True):
    error: Any = None
    retryable: bool = True


class CancelBody(msgspec.Struct, frozen=True):
    reason: ShortText | None = None


class ApproveBody(msgspec.Struct, frozen=True):
    comment: ShortText | None = None
    response: Response = None


class RejectBody(msgspec.Struct, frozen=True):
    reason: Reason
    response: Response = None


class WorkerHeartbeatBody(msgspec.Struct, frozen=True):
    status: ReportedWorkerStatus = "ready"


class CreateApiKeyBody(msgspec.Struct, frozen=True):
    name: Name
    roles: Roles


class BreakerSettings(msgspec.Struct, frozen=True):
    failures: BreakerFailures = DEFAULT_BREAKER_FAILURES
    """Consecutive failed attempts (non-retryable failures, lease expiries) that open a worker's breaker."""
    cooldown_seconds: BreakerCooldown = DEFAULT_BREAKER_COOLDOWN_SECONDS
    """How long an open breaker keeps the worker from being offered tasks."""


class QueueSettingsBody(msgspec.Struct, frozen=True):
    """``PUT /v1/queues/{name}``: the queue's settings, whole (what is left out takes its default)."""

    strategy: ClaimStrategyName = "fifo"
    breaker: BreakerSettings = BreakerSettings()


class EnvironmentBody(msgspec.Struct, frozen=True):
    """``POST /v1/environments``: a new environment and the queues it holds (its first queue is where a
    submit naming the environment without a queue goes)."""

    name: EnvironmentName
    queues: EnvironmentQueues = ()
    labels: Labels = {}


class EnvironmentReplaceBody(msgspec.Struct, frozen=True):
    """``PUT /v1/environments/{name}``: the environment's queues and labels, replaced whole."""

    queues: EnvironmentQueues = ()
    labels: Labels = {}


class PolicyBundleBody(msgspec.Struct, frozen=True):
    """A policy bundle as ``controlplane policies push`` sends it: Rego modules by path, the data
    document, and the compiled ``policy.wasm`` (base64) when the bundle was built with ``opa build -t wasm``."""

    modules: PolicyModules
    data: dict[str, Any] = {}
    wasm: bytes | None = None
    revision: Revision = ""


class ScheduleBody(msgspec.Struct, frozen=True):
    """``POST /v1/schedules``: submit ``task`` (a submit body, as ``POST /v1/tasks`` takes) at each time
    ``cron`` names in ``timezone``; ``overlap`` says what a fire does while the previous run is open."""

    cron: CronExpression
    task: SubmitTaskBody
    id: Token | None = None
    timezone: TimeZoneName = "UTC"
    overlap: ScheduleOverlap = "skip"
    paused: bool = False


class NotificationChannelReplaceBody(msgspec.Struct, frozen=True):
    """``PUT /v1/notification-channels/{name}``: the channel, replaced whole. ``slack``: ``url``;
    ``webhook``: ``url`` and ``secret`` (its Standard Webhooks signing secret); ``email``: ``smtp`` and,
    when the server wants a login, ``smtp.username`` with the password as ``secret``."""

    kind: ChannelKind
    url: ChannelUrl | None = None
    smtp: SmtpSpec | None = None
    secret: OneLine | None = None


class NotificationChannelBody(NotificationChannelReplaceBody, frozen=True, kw_only=True):
    """``POST /v1/notification-channels``: a new channel named ``name``."""

    name: ChannelName


class NotificationRuleBody(msgspec.Struct, frozen=True):
    """``POST /v1/notification-rules``: send to ``channel`` when one of ``on`` happens to a task of
    ``queue``, ``environment`` and ``workflow`` (a workflow name); each filter left out matches any."""

    channel: ChannelName
    on: Triggers
    id: Token | None = None
    queue: Token | None = None
    environment: Token | None = None
    workflow: Name | None = None
