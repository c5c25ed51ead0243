"""Every fact the log can hold. One frozen, tagged msgspec Struct per event type; ``type`` is the tag
and ``v`` the schema version. Old events are never rewritten: register an upcaster instead.

Events marked *timer* are fired by JetStream message schedules into the aggregate's subject. Each
carries what it guards (a lease id, an approval id, an attempt); folding one whose guarded thing has
moved on is a no-op."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar, Literal

import msgspec

Priority = Literal["critical", "high", "normal", "low"]
TaskStatus = Literal["pending", "running", "awaiting_approval", "completed", "failed", "cancelled", "timed_out"]
WorkerStatus = Literal["starting", "ready", "busy", "draining", "offline", "failed"]
Vote = Literal["approve", "reject"]
ApprovalOutcome = Literal["approved", "rejected"]
ApprovalKind = Literal["approval", "question"]

PRIORITY_RANK: dict[str, int] = {"critical": 0, "high": 1, "normal": 2, "low": 3}
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "timed_out"})


class Event(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    """Base of every event. ``at`` is the moment the fact became true (injected, never read here)."""

    VERSION: ClassVar[int] = 1
    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset()
    """Fields that never leave the log: the SSE feed, webhooks, integration consumers and audit exports
    show them redacted, in the same shape (``core.domain.public``)."""
    v: int = 1
    at: datetime


class WorkflowRef(msgspec.Struct, frozen=True):
    name: str
    version: int | None = None


class Escalation(msgspec.Struct, frozen=True):
    after_seconds: float
    approvers: tuple[str, ...]


class PolicyDecision(msgspec.Struct, frozen=True, kw_only=True):
    """What a policy engine answered, as the log records it; the ``result`` of a journal operation of
    kind ``policy``. The engines' own result (``policies_wasm.engine.Decision``) has these fields: the
    domain may not import the engines nor they the domain, so :meth:`from_engine` is the one place an
    engine's answer becomes this record, and tests/policies/test_decision_record.py holds the two
    declarations to the same fields."""

    entrypoint: str
    value: Any
    engine: str
    bundle_digest: str
    input_digest: str
    duration_ms: float

    @classmethod
    def from_engine(cls, decided: object) -> PolicyDecision:
        """The record of an engine's decision (any object with these fields as attributes)."""
        return msgspec.convert(decided, cls, from_attributes=True)

    @property
    def allows(self) -> bool:
        return isinstance(self.value, dict) and self.value.get("allow") is True

    @property
    def needs_approval(self) -> bool:
        return isinstance(self.value, dict) and self.value.get("require_approval") is True

    @property
    def reasons(self) -> list[str]:
        found = self.value.get("reasons") if isinstance(self.value, dict) else None
        return [str(reason) for reason in found] if isinstance(found, list) else []


# --- task -----------------------------------------------------------------------------------------


class TaskSubmitted(Event, frozen=True, tag="TaskSubmitted"):
    task_id: str
    org: str
    queue: str
    task_type: str
    payload: Any
    priority: Priority
    required_capabilities: tuple[str, ...]
    max_retries: int
    timeout_seconds: float | None
    retry_backoff_seconds: float
    metadata: dict[str, Any]
    workflow: WorkflowRef | None
    submitted_by: str
    policy: PolicyDecision | None = None
    """The submit policy's decision; when it requires approval the task starts awaiting it."""
    policy_version: int | None = None
    """The org's policy bundle version in force at submit (null: the shipped policies, as no bundle
    was pushed). The task keeps it: every policy its workflow asks is decided by that version."""
    environment: str | None = None
    """The environment of the task's queue when it was submitted, as the server's environments said
    (null: the queue belonged to none, or the event predates environments). The submit policy decided
    on it; the task keeps it even if the queue moves to another environment later."""
    excluded_workers: tuple[str, ...] = ()
    """Worker ids never offered this task (and refused if they claim it)."""


class TaskSubmissionDenied(Event, frozen=True, tag="TaskSubmissionDenied"):
    """The submit policy refused the task: it was never created. Kept so an audit sees who tried what
    and why it was refused."""

    task_id: str
    task_type: str
    queue: str
    submitted_by: str
    decision: PolicyDecision


class TaskClaimed(Event, frozen=True, tag="TaskClaimed"):
    worker_id: str
    lease_id: str
    lease_seconds: float
    lease_expires_at: datetime
    attempt: int
    workflow_version: int | None = None
    """Set when the task named its workflow without a version: the newest version this worker hosts,
    to which the task is pinned from now on, so no other version ever replays it."""
    claimed_by: str | None = None
    """The actor id of the credential that claimed (``key:<key id>``, ``jwt:<sub>``): the lease is bound
    to it, and every lease-bound command from another credential is refused. None in events recorded
    before leases were bound (such a lease goes with its id and worker id alone)."""


class TaskHeartbeat(Event, frozen=True, tag="TaskHeartbeat"):
    worker_id: str
    lease_id: str
    lease_expires_at: datetime
    progress: Any = None


class TaskLeaseExpired(Event, frozen=True, tag="TaskLeaseExpired"):
    """timer: the lease ``lease_id`` was not renewed in time."""

    lease_id: str


class TaskLeaseReleased(Event, frozen=True, tag="TaskLeaseReleased"):
    """The lease ``lease_id`` of ``worker_id`` was given up before it ran out, because the process that
    held it is gone (``reason``: ``worker restarted``, a new incarnation of the worker registered). Folded
    as an expiry is: the attempt counts, and the task is pending again, or timed out with no retries left."""

    lease_id: str
    worker_id: str
    reason: str


class ApprovalRequested(Event, frozen=True, tag="ApprovalRequested"):
    approval_id: str
    lease_id: str
    requested_by: str
    requested_by_actor: str
    reason: str
    approvers: tuple[str, ...]
    quorum: int
    expires_at: datetime | None
    escalation: Escalation | None
    journal_index: int | None = None
    """Set when a workflow asked: the position of this wait in the workflow's journal."""
    details: Any = None
    """What is being approved, as the requester attached it: a plan, a diff, a tool call and its arguments."""
    form: dict[str, Any] | None = None
    """A JSON Schema (draft 2020-12) that every decision's ``response`` satisfies (the gateway checks)."""
    kind: ApprovalKind = "approval"
    """``question`` when a workflow asked a human something (``ctx.ask``): the answer is the response."""


class ApprovalVoteCast(Event, frozen=True, tag="ApprovalVoteCast"):
    """A vote that leaves the approval pending (and, in logs written before the deciding vote moved
    into ``ApprovalDecided.vote``, the deciding vote too, just before its decision)."""

    approval_id: str
    by: str
    decision: Vote
    comment: str | None
    response: Any = None
    """The decider's structured answer; it fits the approval's ``form`` when it has one."""


class DecidingVote(msgspec.Struct, frozen=True, kw_only=True):
    """The vote that made a decision, cast at the decision's ``at``: the fields of ``ApprovalVoteCast``."""

    by: str
    decision: Vote
    comment: str | None
    response: Any = None


class ApprovalDecided(Event, frozen=True, tag="ApprovalDecided"):
    """One event for the vote that decides and the decision, so that deciding appends one message, not an
    atomic batch of two (which a single-node file-backed stream stages on disk: the costliest append
    there is). ``vote`` is None in events written before it existed."""

    approval_id: str
    outcome: ApprovalOutcome
    vote: DecidingVote | None = None


class ApprovalTimedOut(Event, frozen=True, tag="ApprovalTimedOut"):
    """timer: nobody reached a decision before ``expires_at``."""

    approval_id: str


class ApprovalEscalated(Event, frozen=True, tag="ApprovalEscalated"):
    """timer: still pending after the escalation delay; more approvers may now decide."""

    approval_id: str
    approvers: tuple[str, ...]


class TaskCompleted(Event, frozen=True, tag="TaskCompleted"):
    worker_id: str
    lease_id: str
    result: Any


class TaskRetryScheduled(Event, frozen=True, tag="TaskRetryScheduled"):
    worker_id: str
    lease_id: str
    error: Any
    attempt: int
    not_before: datetime


class TaskRetryDue(Event, frozen=True, tag="TaskRetryDue"):
    """timer: the backoff of retry ``attempt`` has elapsed."""

    attempt: int


class TaskFailed(Event, frozen=True, tag="TaskFailed"):
    worker_id: str
    lease_id: str
    error: Any


class TaskCancelled(Event, frozen=True, tag="TaskCancelled"):
    by: str
    reason: str | None


class WorkflowOperationRecorded(Event, frozen=True, tag="WorkflowOperationRecorded"):
    """One durable workflow operation (a step, an LLM call, a policy decision, a clock or id read) at
    position ``index`` of the journal; on replay its result is returned instead of re-running it."""

    index: int
    kind: str
    name: str
    result: Any
    worker_id: str
    lease_id: str


class LlmUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LlmCall(msgspec.Struct, frozen=True, kw_only=True):
    """The ``result`` of a ``WorkflowOperationRecorded`` of kind ``llm``: what was asked, what came
    back and what it cost. The usage read model sums these."""

    request: dict[str, Any] = {}
    model: str
    provider: str | None = None
    content: str | None
    usage: LlmUsage | None = None
    cost_usd: float | None = None


class PolicyDecided(Event, frozen=True, tag="PolicyDecided"):
    """A policy decision a workflow asked for (``ctx.policy``, or the check before a model or tool
    call) at position ``index`` of its journal. A replay is answered from it and decides nothing
    again; an audit sees which bundle decided, on what input (by digest), and how."""

    index: int
    decision: PolicyDecision
    worker_id: str
    lease_id: str


class WorkflowSleepStarted(Event, frozen=True, tag="WorkflowSleepStarted"):
    """A durable sleep: the lease is released and the task waits, pending, until ``until``."""

    index: int
    until: datetime
    worker_id: str
    lease_id: str


class WorkflowNonDeterministic(Event, frozen=True, tag="WorkflowNonDeterministic"):
    """The code asked for something other than what the journal holds at ``index``: the task is
    parked, nothing is guessed."""

    index: int
    expected: Any
    actual: Any
    worker_id: str
    lease_id: str


class TaskResumed(Event, frozen=True, tag="TaskResumed"):
    """A parked task may be claimed again (after the workflow code was fixed)."""

    by: str


class TaskTimedOut(Event, frozen=True, tag="TaskTimedOut"):
    """timer: the run deadline ``deadline_at`` (first claim + timeout_seconds) has passed."""

    deadline_at: datetime


class TaskSignalled(Event, frozen=True, tag="TaskSignalled"):
    """Someone sent the task's workflow the signal ``name``. A workflow waiting for that name receives
    it; otherwise the task keeps it, in arrival order, until a wait for that name takes it: each
    signal is delivered once."""

    name: str
    payload: Any
    by: str


class SignalWaitStarted(Event, frozen=True, tag="SignalWaitStarted"):
    """The workflow waits, at position ``index`` of its journal, for a signal ``name`` (none of that
    name was kept): the lease is released and the task cannot be claimed until one arrives, or until
    ``until`` passes (None: no time limit)."""

    index: int
    name: str
    until: datetime | None
    worker_id: str
    lease_id: str


class SignalConsumed(Event, frozen=True, tag="SignalConsumed"):
    """The workflow's wait at position ``index`` took a signal that had arrived before it: the
    ``number``-th signal the task received, the earliest kept one of ``name``. The lease stays held."""

    index: int
    name: str
    number: int
    worker_id: str
    lease_id: str


class SignalWaitTimedOut(Event, frozen=True, tag="SignalWaitTimedOut"):
    """timer: no signal came for the wait at journal position ``index`` before ``at``."""

    index: int


class SecretRead(Event, frozen=True, tag="SecretRead"):
    """The worker holding the task's lease read version ``version`` of the org's secret ``name`` (the
    audit of the read; the value is never in the log). The task's first read of a name pins that
    version: its later reads get it again, even after the secret is rotated, until the task ends.
    Not a journal operation: a replay reads again and is not checked against it."""

    name: str
    version: int
    worker_id: str
    lease_id: str
    read_by: str


# --- worker ---------------------------------------------------------------------------------------


class WorkerRegistered(Event, frozen=True, tag="WorkerRegistered"):
    worker_id: str
    queue: str
    capabilities: tuple[str, ...]
    labels: dict[str, str]
    model: str | None
    provider: str | None
    heartbeat_timeout_seconds: float
    incarnation: str | None = None
    """The registering process's token (one per process start), as the registration gave it; None when
    it gave none (or the event predates incarnations): the worker keeps the incarnation it had."""
    restarted: bool = False
    """The registration came from a new incarnation of a worker that had one recorded (or none yet): the
    leases the worker held under the registering credential are released (``TaskLeaseReleased``)."""


class WorkerHeartbeat(Event, frozen=True, tag="WorkerHeartbeat"):
    status: WorkerStatus


class WorkerHeartbeatMissed(Event, frozen=True, tag="WorkerHeartbeatMissed"):
    """timer: no heartbeat since ``last_heartbeat_at`` within the worker's heartbeat timeout."""

    last_heartbeat_at: datetime


class WorkerFailed(Event, frozen=True, tag="WorkerFailed"):
    reason: str


class WorkerDeregistered(Event, frozen=True, tag="WorkerDeregistered"):
    pass


class WorkerAttemptFailed(Event, frozen=True, tag="WorkerAttemptFailed"):
    """An attempt by this worker failed: ``failed`` (a non-retryable failure it reported) or
    ``lease_expired`` (a lease it held ran out). Counts toward its circuit breaker."""

    task_id: str
    reason: Literal["failed", "lease_expired"]


class WorkerAttemptSucceeded(Event, frozen=True, tag="WorkerAttemptSucceeded"):
    """An attempt by this worker completed its task: the breaker's failure count starts again."""

    task_id: str


class WorkerBreakerOpened(Event, frozen=True, tag="WorkerBreakerOpened"):
    """``failures`` consecutive failed attempts: the worker is ``failed`` and offered nothing until
    ``until`` (or an admin's reset)."""

    failures: int
    until: datetime


class WorkerBreakerReset(Event, frozen=True, tag="WorkerBreakerReset"):
    """The breaker closes: timer (``by`` None) when the cool-down ``until`` passed, or an admin's reset."""

    until: datetime
    by: str | None = None


# --- orgs and credentials -------------------------------------------------------------------------


class OrgCreated(Event, frozen=True, tag="OrgCreated"):
    org: str
    name: str
    created_by: str


class ApiKeyCreated(Event, frozen=True, tag="ApiKeyCreated"):
    """The key itself is never stored: only a SHA-256 of its secret part."""

    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset({"secret_sha256"})
    key_id: str
    name: str
    roles: tuple[str, ...]
    secret_sha256: str
    created_by: str


class ApiKeyRevoked(Event, frozen=True, tag="ApiKeyRevoked"):
    key_id: str
    revoked_by: str


# --- policies -------------------------------------------------------------------------------------


class PolicyBundlePushed(Event, frozen=True, tag="PolicyBundlePushed"):
    """Version ``version`` of the org's policy bundle: Rego modules (path -> source), the data
    document, and the compiled ``policy.wasm`` when the bundle had one. New submissions are decided
    by the newest version; a task keeps the version it was submitted under."""

    version: int
    digest: str
    """``sha256:…`` over the content, as ``policies_wasm.Bundle.digest`` defines it."""
    modules: dict[str, str]
    data: dict[str, Any]
    entrypoints: tuple[str, ...]
    pushed_by: str
    wasm: bytes | None = None
    revision: str = ""


# --- environments ---------------------------------------------------------------------------------


class EnvironmentDefined(Event, frozen=True, tag="EnvironmentDefined"):
    """The org's environment ``name`` now holds exactly ``queues`` and ``labels`` (created, or replaced
    whole). Recorded on the org's one environments aggregate, which keeps a queue in at most one."""

    name: str
    queues: tuple[str, ...]
    labels: dict[str, str]
    defined_by: str


class EnvironmentDeleted(Event, frozen=True, tag="EnvironmentDeleted"):
    """The environment is gone; its queues belong to none (tasks keep the environment they recorded)."""

    name: str
    deleted_by: str


# --- schedules ------------------------------------------------------------------------------------

ScheduleOverlap = Literal["skip", "allow", "cancel_previous"]
ScheduleRunOutcome = Literal["submitted", "skipped", "cancelled_previous", "denied", "failed"]


class ScheduleCreated(Event, frozen=True, tag="ScheduleCreated"):
    """The schedule ``schedule_id`` submits ``task`` (a submit body) at each time ``cron`` names in
    ``timezone``. ``generation`` counts the schedules of this id (a deleted id may be created again):
    fire timers and run task ids carry it, so nothing of an earlier one fires into a later one."""

    schedule_id: str
    cron: str
    timezone: str
    task: dict[str, Any]
    overlap: ScheduleOverlap
    paused: bool
    next_fire_at: datetime | None
    """Computed from the command's time: null when created paused."""
    generation: int
    created_by: str


class SchedulePaused(Event, frozen=True, tag="SchedulePaused"):
    """No more fires until resumed; a fire that came and has no run yet is dropped."""

    by: str


class ScheduleResumed(Event, frozen=True, tag="ScheduleResumed"):
    """Fires again from ``next_fire_at`` (the first cron time after the resume: none is caught up)."""

    by: str
    next_fire_at: datetime


class ScheduleFired(Event, frozen=True, tag="ScheduleFired"):
    """timer: the cron time ``at`` of generation ``generation`` has come. It lands on the fire subject
    ``cp.<org>.schedulefire.<schedule id>``, which the scheduler follows, not on the schedule's own
    (releases before ADR 0011 fired it there; such a fire folds as nothing). The schedule names ``at``
    as its next fire until the fire's run is recorded (``ScheduleRunRecorded``), which arms the next."""

    generation: int


class ScheduleRunRecorded(Event, frozen=True, tag="ScheduleRunRecorded"):
    """What the fire at ``fire_at`` (or a trigger, ``manual``) did: submitted ``task_id``, skipped it
    (the previous run still open), cancelled the previous run and submitted, or the submit was denied
    by policy or failed. ``next_fire_at`` is the next cron time after the later of ``fire_at`` and the
    recording's own time: after downtime, one catch-up run, not a burst."""

    fire_at: datetime
    task_id: str | None
    outcome: ScheduleRunOutcome
    reason: str | None = None
    cancelled_task_id: str | None = None
    manual: bool = False
    next_fire_at: datetime | None = None


class ScheduleDeleted(Event, frozen=True, tag="ScheduleDeleted"):
    by: str


# --- queue settings -------------------------------------------------------------------------------

ClaimStrategy = Literal["fifo", "least_loaded", "round_robin", "random"]


class QueueConfigured(Event, frozen=True, tag="QueueConfigured"):
    """The org's queue ``queue`` now hands tasks to waiting workers by ``strategy``, and opens a
    worker's circuit breaker after ``breaker_failures`` consecutive failed attempts for
    ``breaker_cooldown_seconds`` (replacing whatever it had before)."""

    queue: str
    strategy: ClaimStrategy
    breaker_failures: int
    breaker_cooldown_seconds: float
    configured_by: str


class QueueSettingsRemoved(Event, frozen=True, tag="QueueSettingsRemoved"):
    """The queue is back to the defaults."""

    queue: str
    removed_by: str


# --- notifications --------------------------------------------------------------------------------

ChannelKind = Literal["slack", "email", "webhook"]
NotificationTrigger = Literal[
    "approval_requested", "approval_escalated", "approval_timed_out", "task_failed", "task_parked"
]


class SmtpSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where an ``email`` channel sends: the SMTP server, whether to upgrade with STARTTLS, the login
    (its password is the channel's ``secret``), and the envelope's sender and recipients."""

    host: str
    port: int
    starttls: bool = False
    username: str | None = None
    sender: str = msgspec.field(name="from")
    recipients: tuple[str, ...] = msgspec.field(name="to")


class SealedText(msgspec.Struct, frozen=True):
    """A value sealed by the gateway's master key (envelope encryption, ``core.secret_box``): its own
    data key wrapped by master key ``key_id``, the nonce and the AES-256-GCM ciphertext. Never the
    value itself: whoever reads the log without the master key learns nothing of it."""

    key_id: str
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes


class NotificationChannelDefined(Event, frozen=True, tag="NotificationChannelDefined"):
    """The org's notification channel ``name`` (created, or replaced whole): a Slack-compatible incoming
    webhook (``url``), e-mail over SMTP (``smtp``), or a Standard Webhooks endpoint (``url``, signed with
    ``secret``). ``secret`` is the webhook's signing secret or the SMTP password. The URL is secret too
    (a Slack incoming webhook's URL is its credential): both are sealed, and ``endpoint`` shows where
    the channel posts without what may be secret in the URL."""

    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset({"url", "secret"})
    name: str
    kind: ChannelKind
    url: SealedText | None
    endpoint: str | None
    smtp: SmtpSettings | None
    secret: SealedText | None
    defined_by: str


class NotificationChannelRewrapped(Event, frozen=True, tag="NotificationChannelRewrapped"):
    """The channel ``name`` as defined at ``defined_at`` had its sealed ``url`` and ``secret`` wrapped
    again by the current master key (a rotation): the same values, which the new key opens from now on."""

    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset({"url", "secret"})
    name: str
    defined_at: datetime
    url: SealedText | None
    secret: SealedText | None
    by: str


class NotificationChannelDeleted(Event, frozen=True, tag="NotificationChannelDeleted"):
    name: str
    deleted_by: str


class NotificationRuleDefined(Event, frozen=True, tag="NotificationRuleDefined"):
    """Send to ``channel`` when one of ``on`` happens to a task of ``queue``, ``environment`` and
    ``workflow`` (each: any when null)."""

    rule_id: str
    channel: str
    on: tuple[NotificationTrigger, ...]
    queue: str | None
    environment: str | None
    workflow: str | None
    defined_by: str


class NotificationRuleDeleted(Event, frozen=True, tag="NotificationRuleDeleted"):
    rule_id: str
    deleted_by: str


class NotificationSent(Event, frozen=True, tag="NotificationSent"):
    """The notifier handed the message of rule ``rule_id`` about the event at ``source_seq`` to its
    channel (the SMTP server or the webhook answered 2xx). ``message_id`` is what the receiver
    deduplicates on: the e-mail's ``Message-ID``, the webhook's ``webhook-id``."""

    notification_id: str
    rule_id: str
    channel: str
    kind: ChannelKind
    trigger: NotificationTrigger
    source_seq: int
    source_type: str
    task_id: str
    approval_id: str | None
    message_id: str


class NotificationDeadLettered(Event, frozen=True, tag="NotificationDeadLettered"):
    """The channel refused the message, or kept failing for ``deliveries`` attempts: it was not sent,
    and the source event went to the notifier's dead letters with ``error``."""

    notification_id: str
    rule_id: str
    channel: str
    kind: ChannelKind
    trigger: NotificationTrigger
    source_seq: int
    source_type: str
    task_id: str
    approval_id: str | None
    deliveries: int
    error: str


# --- worker configuration -------------------------------------------------------------------------


class LlmSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How runners call models (LiteLLM): every field unset (null) leaves the workflow's own choice."""

    api_base: str | None = None
    """The LLM gateway (a LiteLLM proxy) every call goes to, as LiteLLM's ``api_base``."""
    model_override: str | None = None
    """The model every call uses instead of the one the workflow names."""
    fallbacks: tuple[str, ...] | None = None
    """Models LiteLLM tries in turn when the call fails (its ``fallbacks``)."""


class WorkerConfigSet(Event, frozen=True, tag="WorkerConfigSet"):
    """The org's worker configuration (``environment`` null), or one environment's, is now exactly
    this (replaced whole). A worker gets the org's, overridden field by field by its queue's
    environment's; a null field sets nothing."""

    environment: str | None
    heartbeat_interval_seconds: float | None
    lease_seconds: float | None
    llm: LlmSettings
    set_by: str


# --- secrets --------------------------------------------------------------------------------------


class SecretVersionSet(Event, frozen=True, tag="SecretVersionSet"):
    """Version ``version`` of the org's secret ``name`` (org-wide when ``environment`` is null): its
    value sealed by envelope encryption. Only ciphertext is here: a data key of its own wrapped by the
    master key ``key_id``, the nonce and the AES-256-GCM ciphertext, whose associated data binds the org,
    the name, the version and the environment. Every reader outside the log sees these redacted."""

    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset({"wrapped_key", "nonce", "ciphertext"})
    name: str
    version: int
    environment: str | None
    key_id: str
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes
    set_by: str


class SecretVersionRewrapped(Event, frozen=True, tag="SecretVersionRewrapped"):
    """Version ``version`` of the secret ``name`` had its data key wrapped again, by master key
    ``key_id`` instead of ``from_key_id`` (a master key rotation): the same ciphertext, which the new
    key opens from now on. The wrapped key is redacted for every reader outside the log."""

    SECRET_FIELDS: ClassVar[frozenset[str]] = frozenset({"wrapped_key"})
    name: str
    version: int
    from_key_id: str
    key_id: str
    wrapped_key: bytes
    by: str


TaskEvent = (
    TaskSubmitted
    | TaskSubmissionDenied
    | TaskClaimed
    | TaskHeartbeat
    | TaskLeaseExpired
    | TaskLeaseReleased
    | ApprovalRequested
    | ApprovalVoteCast
    | ApprovalDecided
    | ApprovalTimedOut
    | ApprovalEscalated
    | TaskCompleted
    | TaskRetryScheduled
    | TaskRetryDue
    | TaskFailed
    | TaskCancelled
    | TaskTimedOut
    | WorkflowOperationRecorded
    | PolicyDecided
    | WorkflowSleepStarted
    | WorkflowNonDeterministic
    | TaskResumed
    | TaskSignalled
    | SignalWaitStarted
    | SignalConsumed
    | SignalWaitTimedOut
    | SecretRead
)
WorkerEvent = (
    WorkerRegistered
    | WorkerHeartbeat
    | WorkerHeartbeatMissed
    | WorkerFailed
    | WorkerDeregistered
    | WorkerAttemptFailed
    | WorkerAttemptSucceeded
    | WorkerBreakerOpened
    | WorkerBreakerReset
)
AccessEvent = OrgCreated | ApiKeyCreated | ApiKeyRevoked
PolicyEvent = PolicyBundlePushed
EnvironmentEvent = EnvironmentDefined | EnvironmentDeleted
ScheduleEvent = (
    ScheduleCreated | SchedulePaused | ScheduleResumed | ScheduleFired | ScheduleRunRecorded | ScheduleDeleted
)
NotificationConfigEvent = (
    NotificationChannelDefined
    | NotificationChannelRewrapped
    | NotificationChannelDeleted
    | NotificationRuleDefined
    | NotificationRuleDeleted
)
NotificationEvent = NotificationSent | NotificationDeadLettered
WorkerConfigEvent = WorkerConfigSet
SecretEvent = SecretVersionSet | SecretVersionRewrapped
QueueEvent = QueueConfigured | QueueSettingsRemoved
AnyEvent = (
    TaskEvent
    | WorkerEvent
    | AccessEvent
    | PolicyEvent
    | EnvironmentEvent
    | ScheduleEvent
    | NotificationConfigEvent
    | NotificationEvent
    | WorkerConfigEvent
    | SecretEvent
    | QueueEvent
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        *TaskEvent.__args__,  # type: ignore[attr-defined]
        *WorkerEvent.__args__,  # type: ignore[attr-defined]
        *AccessEvent.__args__,  # type: ignore[attr-defined]
        PolicyBundlePushed,
        *EnvironmentEvent.__args__,  # type: ignore[attr-defined]
        *ScheduleEvent.__args__,  # type: ignore[attr-defined]
        *NotificationConfigEvent.__args__,  # type: ignore[attr-defined]
        *NotificationEvent.__args__,  # type: ignore[attr-defined]
        WorkerConfigSet,
        *SecretEvent.__args__,  # type: ignore[attr-defined]
        *QueueEvent.__args__,  # type: ignore[attr-defined]
    )
}

TASK_EVENT_TYPES = frozenset(
    cls.__struct_config__.tag  # type: ignore[misc]
    for cls in TaskEvent.__args__  # type: ignore[attr-defined]
)
"""The types of the events a task's subject holds, and no other subject does."""

# --- encoding, versions and upcasting ------------------------------------------------------------

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}
"""(type, from_version) -> function returning the payload at from_version + 1."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


class UnknownEvent(ValueError):
    """The log holds an event type or version this code cannot read."""


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


class _Tagged(msgspec.Struct):
    type: str


_tag_decoder = msgspec.json.Decoder(_Tagged)


def event_type_of(data: bytes) -> str:
    """The ``type`` tag of a stored event, read without decoding the rest: what a reader that keeps only
    some types checks first. ``msgspec.DecodeError`` when the payload is no JSON object with a tag."""
    return _tag_decoder.decode(data).type


def decode_event(data: bytes) -> AnyEvent:
    try:
        event = _decoder.decode(data)
    except msgspec.ValidationError:
        return _decode_old_version(data)
    if event.v != type(event).VERSION:
        return _decode_old_version(data)
    return event


def _decode_old_version(data: bytes) -> AnyEvent:
    raw = msgspec.json.decode(data)
    if not isinstance(raw, dict) or raw.get("type") not in EVENT_TYPES:
        raise UnknownEvent(f"unknown event type in {data[:80]!r}")
    current = EVENT_TYPES[raw["type"]].VERSION
    version = raw.get("v", 1)
    if not isinstance(version, int) or version > current:
        raise UnknownEvent(f"{raw['type']} v{version} is newer than this code (v{current}); upgrade first")
    while version < current:
        upcast = UPCASTERS.get((raw["type"], version))
        if upcast is None:
            raise UnknownEvent(f"no upcaster for {raw['type']} v{version}")
        raw = {**upcast(raw), "v": version + 1}
        version += 1
    return msgspec.convert(raw, AnyEvent)
