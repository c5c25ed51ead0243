"""The metrics operators alert on, per org and queue (ADR 0009, docs/operations.md).

Two sources, each where it is exact and cheap:

- **Gauges** (queue depth, oldest claimable task, approvals pending and the oldest of them, parked
  tasks) are read from the read model at scrape time by ``gateway.queue_gauges.QueueGauges``: one
  bounded system query (``ReadModel.queue_summary``), its answer cached for a few seconds and shared by
  concurrent scrapes, so scraping cannot load PostgreSQL.
- **Counters and histograms** (submissions, outcomes and durations, retries, lease expiries, approval
  waits, LLM tokens and cost, policy decisions, timer lateness) are folded from the log by
  :class:`EventMetrics`, which the gateway's claim index hands every task event it follows, once, in
  log order. Every gateway follows the whole log, so each one's counters describe the whole system
  since it started: aggregate them across gateways with ``max``, never ``sum``.

Label values are bounded by a :class:`LabelBudget`: never a task id, and at most so many orgs, queues
and models; whatever is past the budget is counted under ``_other`` (not a valid org or queue token,
so it never collides with a real one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from core.domain.events import (
    LlmCall,
    LlmUsage,
    PolicyDecided,
    PolicyDecision,
    TaskLeaseExpired,
    TaskLeaseReleased,
    TaskSubmissionDenied,
    TaskSubmitted,
    WorkflowOperationRecorded,
)
from core.domain.records import RecordedEvent
from core.domain.subjects import parse_aggregate_subject
from core.domain.task import TIMER_EVENTS, Task
from core.domain.task_decider import TASK
from core.log.event_store import TIMER_ACTOR

OTHER = "_other"
"""The label value of everything past the budget."""

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400)
"""Seconds from submit to a terminal state: agent work takes seconds to hours, a human days."""
APPROVAL_BUCKETS = (5, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400)
POLICY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300)
RETRY_REASONS: dict[type, str] = {TaskLeaseExpired: "lease_expired", TaskLeaseReleased: "worker_restarted"}
"""``reason`` of ``cp_task_retries_total`` by the event that sent the task back; a retryable failure otherwise."""


# --- label budget ---------------------------------------------------------------------------------


@dataclass
class LabelBudget:
    """Which org, queue and model names get a label value of their own. The first ones this process
    meets keep theirs for its whole life (a counter's series must not change name half-way); at a
    scrape the queues with the most open tasks are met first. Past the budget an org becomes
    ``_other`` (with queue ``_other``), a queue ``_other`` within its org, a model or policy
    entrypoint ``_other``. So a metric labelled by org and queue has at most
    ``max_pairs + max_orgs + 1`` label pairs, whatever the tenants do."""

    max_orgs: int = 25
    max_queues_per_org: int = 20
    max_pairs: int = 100
    max_values: int = 20
    """Per free-text label (model, policy entrypoint)."""
    _orgs: set[str] = field(default_factory=set)
    _pairs: set[tuple[str, str]] = field(default_factory=set)
    _queues_of: dict[str, int] = field(default_factory=dict)
    _values: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> LabelBudget:
        """``CP_METRICS_MAX_ORGS``, ``CP_METRICS_MAX_QUEUES_PER_ORG``, ``CP_METRICS_MAX_PAIRS``,
        ``CP_METRICS_MAX_VALUES`` (models, entrypoints); the defaults otherwise."""
        env, default = os.environ, cls()
        return cls(
            max_orgs=int(env.get("CP_METRICS_MAX_ORGS", default.max_orgs)),
            max_queues_per_org=int(env.get("CP_METRICS_MAX_QUEUES_PER_ORG", default.max_queues_per_org)),
            max_pairs=int(env.get("CP_METRICS_MAX_PAIRS", default.max_pairs)),
            max_values=int(env.get("CP_METRICS_MAX_VALUES", default.max_values)),
        )

    def org(self, org: str) -> str:
        if org in self._orgs:
            return org
        if len(self._orgs) < self.max_orgs:
            self._orgs.add(org)
            return org
        return OTHER

    def pair(self, org: str, queue: str) -> tuple[str, str]:
        """The ``(org, queue)`` label values of ``queue`` in ``org``."""
        org_label = self.org(org)
        if org_label == OTHER:
            return OTHER, OTHER
        if (org, queue) in self._pairs:
            return org, queue
        if len(self._pairs) < self.max_pairs and self._queues_of.get(org, 0) < self.max_queues_per_org:
            self._pairs.add((org, queue))
            self._queues_of[org] = self._queues_of.get(org, 0) + 1
            return org, queue
        return org, OTHER

    def value(self, kind: str, value: str) -> str:
        """The label value of a model or policy entrypoint (``kind`` keeps their budgets apart)."""
        known = self._values.setdefault(kind, set())
        if value in known:
            return value
        if len(known) < self.max_values:
            known.add(value)
            return value
        return OTHER


# --- from the log ---------------------------------------------------------------------------------


def _slim(before: Task | None, after: Task) -> Task:
    """``after`` without what no metric reads and may be large (payloads, results, journal results,
    approval details), so the open tasks kept here cost little beside the claim index's. The fold
    never looks at those fields; only the journal's length matters to it, and that is kept."""
    journal = after.journal
    kept = 0 if before is None else len(before.journal)
    if len(journal) > kept:
        journal = (*journal[:kept], *(msgspec.structs.replace(e, result=None) for e in journal[kept:]))
    return msgspec.structs.replace(
        after,
        payload=None,
        metadata={},
        result=None,
        error=None,
        progress=None,
        journal=journal,
        signals=tuple(msgspec.structs.replace(s, payload=None) for s in after.signals),
        approvals=tuple(msgspec.structs.replace(a, details=None, form=None) for a in after.approvals),
    )


def _policy_outcome(decision: PolicyDecision) -> str:
    if not decision.allows:
        return "deny"
    return "require_approval" if decision.needs_approval else "allow"


class EventMetrics:
    """Counters and histograms folded from the task events of the log. Keeps a slim state of each
    open task (seeded from the claim index's snapshot, then evolved by the same pure ``evolve`` as
    every projection), so a transition is counted exactly when the fold says it happened: a timer that
    fires after its lease was renewed expires nothing, a repeated submit submits nothing."""

    def __init__(self, registry: CollectorRegistry, labels: LabelBudget) -> None:
        self._labels = labels
        self._tasks: dict[tuple[str, str], tuple[Task, int]] = {}
        pair = ["org", "queue"]
        self.submitted = Counter("cp_tasks_submitted", "Tasks submitted", pair, registry=registry)
        self.finished = Counter(
            "cp_tasks_finished", "Tasks that reached a terminal state, by it", [*pair, "outcome"], registry=registry
        )
        self.duration = Histogram(
            "cp_task_duration_seconds",
            "From submit to a terminal state",
            pair,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "cp_task_retries", "Tasks put back to pending for another attempt", [*pair, "reason"], registry=registry
        )
        self.lease_expiries = Counter(
            "cp_task_lease_expiries", "Leases that ran out without a heartbeat", pair, registry=registry
        )
        self.approvals_requested = Counter(
            "cp_approvals_requested", "Approvals asked of humans (submit-policy gates too)", pair, registry=registry
        )
        self.approval_wait = Histogram(
            "cp_approval_wait_seconds",
            "From an approval's request to its decision or timeout",
            [*pair, "outcome"],
            buckets=APPROVAL_BUCKETS,
            registry=registry,
        )
        self.llm_calls = Counter("cp_llm_calls", "LLM calls workflows recorded", [*pair, "model"], registry=registry)
        self.llm_tokens = Counter(
            "cp_llm_tokens", "LLM tokens workflows recorded", [*pair, "model", "kind"], registry=registry
        )
        self.llm_cost = Counter(
            "cp_llm_cost_usd", "LLM cost workflows recorded, in US dollars", [*pair, "model"], registry=registry
        )
        self.policy_decisions = Counter(
            "cp_policy_decisions",
            "Policy decisions (at submit, and those workflows asked), by what they answered",
            [*pair, "entrypoint", "decision"],
            registry=registry,
        )
        self.policy_latency = Histogram(
            "cp_policy_decision_seconds",
            "How long the policy engine took to decide",
            ["org", "entrypoint"],
            buckets=POLICY_BUCKETS,
            registry=registry,
        )
        self.timer_lateness = Histogram(
            "cp_timer_lateness_seconds",
            "How long after its due time a durable timer's event reached the log",
            ["timer"],
            buckets=LATENESS_BUCKETS,
            registry=registry,
        )

    def seed(self, org: str, task: Task, seq: int) -> None:
        """A task open at the snapshot the claim index starts from: later events of it are folded."""
        if not task.is_terminal:
            self._tasks[(org, task.id)] = (_slim(None, task), seq)

    def fold(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        if isinstance(event, TIMER_EVENTS) and recorded.actor == TIMER_ACTOR:
            # The server's storage time of the fired message against the due time the timer was armed
            # for: both clocks are NTP-synced hosts, so skew shows up here too (see docs/operations.md).
            lateness = (recorded.recorded_at - event.at).total_seconds()
            self.timer_lateness.labels(type(event).__name__).observe(max(lateness, 0.0))
        address = parse_aggregate_subject(recorded.subject)
        if isinstance(event, TaskSubmissionDenied):  # no task is created: nothing to keep
            self._decided(address.org, event.queue, event.decision)
            return
        key = (address.org, address.id)
        known = self._tasks.get(key)
        if known is None and not isinstance(event, TaskSubmitted):
            return  # closed before the snapshot (or never created): nothing of it is open
        if known is not None and recorded.seq <= known[1]:
            return  # the snapshot already holds it (a projection shard was further on)
        before = None if known is None else known[0]
        after = TASK.evolve(before, event)
        if after is None or after is before:
            return
        self._count(address.org, before, after, recorded)
        if after.is_terminal:
            self._tasks.pop(key, None)
        else:
            self._tasks[key] = (_slim(before, after), recorded.seq)

    def _count(self, org: str, before: Task | None, after: Task, recorded: RecordedEvent) -> None:
        event = recorded.event
        org_label, queue_label = self._labels.pair(org, after.queue)
        if before is None:
            self.submitted.labels(org_label, queue_label).inc()
            if isinstance(event, TaskSubmitted) and event.policy is not None:
                self._decided(org, after.queue, event.policy)
        if after.is_terminal:
            self.finished.labels(org_label, queue_label, after.status).inc()
            ended = after.completed_at or event.at
            self.duration.labels(org_label, queue_label).observe(max((ended - after.created_at).total_seconds(), 0))
        if before is not None and after.retries > before.retries:
            reason = RETRY_REASONS.get(type(event), "failed")
            self.retries.labels(org_label, queue_label, reason).inc(after.retries - before.retries)
        if isinstance(event, TaskLeaseExpired):
            self.lease_expiries.labels(org_label, queue_label).inc()
        was_pending = {a.id for a in (before.approvals if before is not None else ()) if a.status == "pending"}
        known = {a.id for a in before.approvals} if before is not None else set()
        for approval in after.approvals:
            if approval.id not in known:
                self.approvals_requested.labels(org_label, queue_label).inc()
            if approval.id in was_pending and approval.status != "pending" and approval.decided_at is not None:
                waited = (approval.decided_at - approval.created_at).total_seconds()
                self.approval_wait.labels(org_label, queue_label, approval.status).observe(max(waited, 0.0))
        if isinstance(event, WorkflowOperationRecorded) and event.kind == "llm":
            self._llm(org_label, queue_label, event)
        if isinstance(event, PolicyDecided):
            self._decided(org, after.queue, event.decision)

    def _llm(self, org_label: str, queue_label: str, event: WorkflowOperationRecorded) -> None:
        try:
            call = msgspec.convert(event.result, LlmCall)
        except msgspec.ValidationError:
            return  # a worker's own "llm" operation that is not an LlmCall: the usage fold skips it too
        model = self._labels.value("model", call.model)
        usage = call.usage or LlmUsage()
        self.llm_calls.labels(org_label, queue_label, model).inc()
        for kind, tokens in (("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)):
            self.llm_tokens.labels(org_label, queue_label, model, kind).inc(max(tokens, 0))
        self.llm_cost.labels(org_label, queue_label, model).inc(max(call.cost_usd or 0.0, 0.0))

    def _decided(self, org: str, queue: str, decision: PolicyDecision) -> None:
        org_label, queue_label = self._labels.pair(org, queue)
        entrypoint = self._labels.value("entrypoint", decision.entrypoint)
        self.policy_decisions.labels(org_label, queue_label, entrypoint, _policy_outcome(decision)).inc()
        self.policy_latency.labels(org_label, entrypoint).observe(max(decision.duration_ms, 0.0) / 1000)
