"""Commands: what a client asks for. Field constraints live on the types declared here, and the HTTP
request bodies (``application.bodies``) use the same ones, so a body field and the command field it becomes
accept the same values (tests/unit/test_schemas_agree.py checks each pair). Ids of new things (task,
lease, approval) are chosen by the caller and passed in, which keeps the deciders pure."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from core.domain.events import (
    ApprovalKind,
    ChannelKind,
    Escalation,
    Event,
    NotificationTrigger,
    PolicyDecision,
    Priority,
    ScheduleOverlap,
    ScheduleRunOutcome,
    SealedText,
    Vote,
    WorkflowRef,
)
from core.domain.ids import TOKEN_PATTERN, Token, whole

Capability = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Capabilities = Annotated[tuple[Capability, ...], msgspec.Meta(max_length=64)]
ExcludedWorkers = Annotated[tuple[Token, ...], msgspec.Meta(max_length=64)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=366 * 24 * 3600)]
LeaseSeconds = Annotated[float, msgspec.Meta(ge=1, le=24 * 3600)]
WaitSeconds = Annotated[float, msgspec.Meta(ge=0, le=366 * 24 * 3600)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
MaxRetries = Annotated[int, msgspec.Meta(ge=0, le=100)]
RetryBackoff = Annotated[float, msgspec.Meta(ge=0, le=3600)]
Metadata = Annotated[dict[str, Any], msgspec.Meta(max_length=64)]
Approver = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Approvers = Annotated[tuple[Approver, ...], msgspec.Meta(min_length=1, max_length=64)]
Quorum = Annotated[int, msgspec.Meta(ge=1, le=64)]
JournalIndex = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
# Sizes (and that a form is a JSON Schema) are checked before the command is made; a type cannot say them:
Details = Annotated[Any, msgspec.Meta(description="What is being approved (a plan, a diff, a tool call); ≤ 64 KiB")]
Form = Annotated[dict[str, Any], msgspec.Meta(description="A JSON Schema (2020-12) each response must fit; ≤ 16 KiB")]
Response = Annotated[Any, msgspec.Meta(description="A structured answer that fits the approval's form; ≤ 64 KiB")]
SignalPayload = Annotated[Any, msgspec.Meta(description="Any JSON handed to the waiting workflow; ≤ 64 KiB")]


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
    task_type: Name
    payload: Any = None
    queue: Token = "default"
    priority: Priority = "normal"
    required_capabilities: Capabilities = ()
    max_retries: MaxRetries = 3
    timeout_seconds: Seconds | None = None
    retry_backoff_seconds: RetryBackoff = 1.0
    metadata: Metadata = {}
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
    approval_id: Token | None = None
    """None: the task's next (``<task id>-<n>``), counted on the state the command is decided on."""
    reason: Annotated[Reason, msgspec.Meta(description="what the human is approving")]
    approvers: Approvers = ("role:approver",)
    quorum: Quorum = 1
    timeout_seconds: Seconds | None = None
    escalation: Escalation | None = None
    journal_index: JournalIndex | None = None
    details: Details = None
    """What is being approved (any JSON); the gateway bounds its size."""
    form: Form | None = None
    """A JSON Schema the decisions' responses must satisfy; the gateway checks it is one."""
    kind: ApprovalKind = "approval"
    """``question``: a workflow asks a human something and takes the response as the answer."""


class DecideApproval(TaskCommand, frozen=True, kw_only=True):
    approval_id: Token
    decision: Vote
    comment: ShortText | None = None
    response: Response = None
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


OperationKind = Annotated[str, msgspec.Meta(pattern=whole("step|llm|policy|now|uuid"))]


class RecordOperation(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    index: JournalIndex
    kind: OperationKind
    name: Name
    result: Any = None


class StartSleep(TaskCommand, frozen=True, kw_only=True):
    worker_id: Token
    lease_id: Token
    index: JournalIndex
    seconds: WaitSeconds


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
    payload: SignalPayload = {}


class ReleaseLease(TaskCommand, frozen=True, kw_only=True):
    """Give up the lease ``lease_id`` of ``worker_id`` before it runs out: its process is gone (the
    gateway sends it when the worker registers again as a new incarnation). Like any lease-bound command
    it is accepted only from the credential that claimed."""

    worker_id: Token
    lease_id: Token
    reason: ShortText
    claimed_before: datetime
    """Only a lease claimed before this moment (the new process's registration) is released: one the
    new process took since is its own, even when a retried registration asks again."""


class WaitForSignal(TaskCommand, frozen=True, kw_only=True):
    """The workflow waits for a signal ``name`` at journal position ``index``: the earliest kept one of
    that name is taken at once, else the lease is released until one arrives or ``timeout_seconds``
    pass."""

    worker_id: Token
    lease_id: Token
    index: JournalIndex
    name: SignalName
    timeout_seconds: WaitSeconds | None = None


class WorkerCommand(Command, frozen=True, kw_only=True):
    worker_id: Token


class RegisterWorker(WorkerCommand, frozen=True, kw_only=True):
    queue: Token = "default"
    capabilities: Capabilities = ()
    labels: Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=64)] = {}
    model: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    provider: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    heartbeat_timeout_seconds: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    incarnation: Token | None = None
    """An opaque token the registering process chose when it started (a new one per process): a
    registration with another incarnation than the worker's recorded one is a restart, and the leases
    the worker held under the registering credential are released at once. None: no process is named,
    nothing is released, the recorded incarnation stays."""


ReportedWorkerStatus = Literal["ready", "busy", "draining"]
"""The statuses a worker reports itself; the others (starting, offline, failed) the log decides."""


class HeartbeatWorker(WorkerCommand, frozen=True, kw_only=True):
    status: ReportedWorkerStatus = "ready"


class ReportWorkerFailure(WorkerCommand, frozen=True, kw_only=True):
    reason: ShortText


class DeregisterWorker(WorkerCommand, frozen=True, kw_only=True):
    pass


DEFAULT_BREAKER_FAILURES = 3
DEFAULT_BREAKER_COOLDOWN_SECONDS = 60.0
BreakerFailures = Annotated[int, msgspec.Meta(ge=1, le=1000)]
BreakerCooldown = Annotated[float, msgspec.Meta(ge=1, le=7 * 24 * 3600)]


class RecordWorkerAttempt(WorkerCommand, frozen=True, kw_only=True):
    """The gateway tells the worker how an attempt of its ended (from the task's events): a
    non-retryable failure or an expired lease counts toward its circuit breaker; a success resets it.
    The breaker's settings are the worker's queue's, as the gateway found them."""

    task_id: Token
    outcome: Annotated[str, msgspec.Meta(pattern=whole("succeeded|failed|lease_expired"))]
    breaker_failures: BreakerFailures = DEFAULT_BREAKER_FAILURES
    breaker_cooldown_seconds: BreakerCooldown = DEFAULT_BREAKER_COOLDOWN_SECONDS


class ResetWorkerBreaker(WorkerCommand, frozen=True, kw_only=True):
    """An admin closes the worker's open circuit breaker before its cool-down ends."""


ROLES = frozenset({"admin", "submitter", "worker", "approver", "viewer"})
Role = Annotated[str, msgspec.Meta(pattern=whole("|".join(sorted(ROLES))))]
Roles = Annotated[tuple[Role, ...], msgspec.Meta(min_length=1, max_length=5)]


class CreateOrg(Command, frozen=True, kw_only=True):
    org: Token
    name: Name


class CreateApiKey(Command, frozen=True, kw_only=True):
    key_id: Token
    name: Name
    roles: Roles
    secret_sha256: Annotated[str, msgspec.Meta(pattern=whole("[0-9a-f]{64}"))]


class RevokeApiKey(Command, frozen=True, kw_only=True):
    key_id: Token


ModulePath = Annotated[str, msgspec.Meta(min_length=6, max_length=256, pattern=whole(r"[^\x00]*\.rego"))]
PolicyModules = Annotated[dict[ModulePath, str], msgspec.Meta(min_length=1, max_length=256)]
Revision = Annotated[str, msgspec.Meta(max_length=256)]


class PushPolicyBundle(Command, frozen=True, kw_only=True):
    """Record a new version of the org's policy bundle. The caller has loaded (compiled) it and
    computed its digest: the decider only keeps versions in order."""

    digest: Annotated[str, msgspec.Meta(pattern=whole("sha256:[0-9a-f]{64}"))]
    modules: PolicyModules
    data: dict[str, Any] = {}
    wasm: bytes | None = None
    revision: Revision = ""
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


ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ApiBase = Annotated[
    str, msgspec.Meta(max_length=2048, pattern=whole(r"https?://[^\s\x00]+"), description="an http(s) URL")
]


class LlmConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The LLM settings an admin gives an org's (or an environment's) runners; null leaves a field unset."""

    api_base: ApiBase | None = None
    model_override: ModelName | None = None
    fallbacks: Annotated[tuple[ModelName, ...], msgspec.Meta(max_length=16)] | None = None


HeartbeatInterval = Annotated[float, msgspec.Meta(ge=1, le=3600)]
"""Seconds between a worker's liveness reports."""


class SetWorkerConfig(Command, frozen=True, kw_only=True):
    """Replace whole the worker configuration of the org (``environment`` None) or of one environment."""

    environment: EnvironmentName | None = None
    heartbeat_interval_seconds: HeartbeatInterval | None = None
    lease_seconds: LeaseSeconds | None = None
    llm: LlmConfig = LlmConfig()


SECRET_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
SecretName = Annotated[
    str, msgspec.Meta(pattern=whole(SECRET_NAME_PATTERN), description="[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
]
SecretVersion = Annotated[int, msgspec.Meta(ge=1)]


class SetSecret(Command, frozen=True, kw_only=True):
    """Record version ``version`` of the secret ``name`` (org-wide, or for one environment), sealed by the
    caller (the decider never sees a value): the version is the one the caller sealed it for, so it must
    be the next one, else it is refused and the caller seals again."""

    name: SecretName
    environment: EnvironmentName | None = None
    version: SecretVersion
    key_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes


class RewrapSecret(Command, frozen=True, kw_only=True):
    """Version ``version`` of the secret ``name``, sealed by master key ``from_key_id``, now has its data
    key wrapped by master key ``key_id`` (a rotation's re-wrap; the ciphertext is unchanged). Refused if
    the version is no longer sealed by ``from_key_id`` (another re-wrap came first)."""

    name: SecretName
    version: SecretVersion
    from_key_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    key_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    wrapped_key: bytes


class ReadSecret(TaskCommand, frozen=True, kw_only=True):
    """The worker holding the task's lease reads the secret ``name``: the version the task is pinned to,
    else ``newest_version`` (the newest that applies to the task's environment, as the caller found it;
    None: none does), which the task is pinned to from then on."""

    worker_id: Token
    lease_id: Token
    name: SecretName
    newest_version: SecretVersion | None


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
    generation: int
    """The schedule's generation the fire (or trigger) belongs to: a fire of an earlier one never runs."""
    task_id: Token | None
    outcome: ScheduleRunOutcome
    reason: ShortText | None = None
    cancelled_task_id: Token | None = None
    manual: bool = False


ChannelName = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN, description="lowercase name [a-z0-9][a-z0-9_-]{0,62}")]
ChannelUrl = Annotated[
    str,
    msgspec.Meta(
        min_length=8, max_length=2048, pattern=whole(r"https?://[^\s\x00-\x1f\x7f]+"), description="http(s) URL"
    ),
]
EmailAddress = Annotated[
    str,
    msgspec.Meta(
        max_length=254,
        pattern=whole(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"),
        description="an e-mail address, local@domain",
    ),
]
HostName = Annotated[
    str,
    msgspec.Meta(
        pattern=whole(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"), description="SMTP host name or IPv4"
    ),
]
MAX_RECIPIENTS = 50
MAX_TRIGGERS = 5
Triggers = Annotated[tuple[NotificationTrigger, ...], msgspec.Meta(min_length=1, max_length=MAX_TRIGGERS)]


# One line, as a header takes it: no control characters nor Unicode line separators, and no space at
# either end (where a paste leaves one that nobody sees).
_LINE_CHAR = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]"
_LINE_END = r"[^\x00-\x20\x7f-\x9f\u2028\u2029]"
OneLine = Annotated[
    str, msgspec.Meta(min_length=1, max_length=1024, pattern=whole(f"{_LINE_END}(?:{_LINE_CHAR}*{_LINE_END})?"))
]


class SmtpSpec(msgspec.Struct, frozen=True, kw_only=True):
    """An ``email`` channel's SMTP server and envelope; the password is the channel's ``secret``."""

    host: HostName
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 25
    starttls: bool = False
    username: OneLine | None = None
    sender: EmailAddress = msgspec.field(name="from")
    recipients: Annotated[tuple[EmailAddress, ...], msgspec.Meta(min_length=1, max_length=MAX_RECIPIENTS)] = (
        msgspec.field(name="to")
    )


class DefineNotificationChannel(Command, frozen=True, kw_only=True):
    """Create the org's notification channel ``name`` (or, with ``replace``, create or replace it whole):
    ``slack`` and ``webhook`` need ``url`` (a webhook also its signing ``secret``), ``email`` needs
    ``smtp`` (its ``secret`` is the SMTP password, if the server wants a login)."""

    name: ChannelName
    kind: ChannelKind
    url: ChannelUrl | None = None
    smtp: SmtpSpec | None = None
    secret: OneLine | None = None
    replace: bool = False
    sealed_url: SealedText | None = None
    sealed_secret: SealedText | None = None
    """``url`` and ``secret`` sealed by the gateway: what the log gets (the command itself is never stored)."""


class RewrapNotificationChannel(Command, frozen=True, kw_only=True):
    """The channel ``name`` as defined at ``defined_at``, its sealed ``url`` and ``secret`` wrapped again
    by the current master key (a rotation's re-wrap). Refused if the channel was defined again since."""

    name: ChannelName
    defined_at: datetime
    url: SealedText | None
    secret: SealedText | None


class DeleteNotificationChannel(Command, frozen=True, kw_only=True):
    name: ChannelName


class DefineNotificationRule(Command, frozen=True, kw_only=True):
    """Send to ``channel`` when one of ``on`` happens to a task of ``queue``, ``environment`` and
    ``workflow`` (each: any when absent)."""

    rule_id: Token
    channel: ChannelName
    on: Triggers
    queue: Token | None = None
    environment: Token | None = None
    workflow: Name | None = None


class DeleteNotificationRule(Command, frozen=True, kw_only=True):
    rule_id: Token


class RecordNotification(Command, frozen=True, kw_only=True):
    """The notifier tells the log what became of notification ``notification_id`` (one rule, one source
    event): ``sent`` to its channel, or ``dead_lettered``. Recorded once."""

    notification_id: Token
    outcome: Annotated[str, msgspec.Meta(pattern=whole("sent|dead_lettered"))]
    rule_id: Token
    channel: ChannelName
    kind: ChannelKind
    trigger: NotificationTrigger
    source_seq: Annotated[int, msgspec.Meta(ge=1)]
    source_type: str
    task_id: Token
    approval_id: Token | None = None
    message_id: str = ""
    deliveries: int = 1
    error: str = ""


# --- queue settings -------------------------------------------------------------------------------

ClaimStrategyName = Annotated[str, msgspec.Meta(pattern=whole("fifo|least_loaded|round_robin|random"))]


class ConfigureQueue(Command, frozen=True, kw_only=True):
    """Set how queue ``queue`` hands tasks to the workers waiting on it, and its circuit breakers."""

    queue: Token
    strategy: ClaimStrategyName = "fifo"
    breaker_failures: BreakerFailures = DEFAULT_BREAKER_FAILURES
    breaker_cooldown_seconds: BreakerCooldown = DEFAULT_BREAKER_COOLDOWN_SECONDS


class RemoveQueueSettings(Command, frozen=True, kw_only=True):
    queue: Token


# --- forks ----------------------------------------------------------------------------------------


class ForkTask(TaskCommand, frozen=True, kw_only=True):
    """Write one part of a fork (``core.domain.history.plan_fork``): ``events``, the source's with the
    fork's ids, onto task ``task_id`` as the parts before left it. A fork longer than one atomic
    append is written in several parts, each a command of its own (``application.fork``)."""

    events: tuple[Event, ...]
    before: Any = None
    """The fork's state (a ``core.domain.task.Task``) before these events; None for the first part,
    which creates the task."""
