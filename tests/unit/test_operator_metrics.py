"""``gateway.metrics.EventMetrics`` counts a transition exactly when the task's own fold says it
happened (a stale timer, a repeated submit count nothing), from a snapshot as well as from the start,
and past the label budget under ``_other``. Pure: events are fed as the claim index would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from core.domain.events import (
    Event,
    TaskCancelled,
    TaskClaimed,
    TaskHeartbeat,
    TaskLeaseExpired,
    TaskSubmitted,
)
from core.domain.records import RecordedEvent
from core.domain.task_decider import TASK
from core.log.event_store import TIMER_ACTOR
from gateway.metrics import OTHER, EventMetrics, LabelBudget

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)


def submitted(task_id: str, queue: str = "q", org: str = "acme", at: datetime = T0) -> TaskSubmitted:
    return TaskSubmitted(
        at=at,
        task_id=task_id,
        org=org,
        queue=queue,
        task_type="t",
        payload={"big": "x" * 1000},
        priority="normal",
        required_capabilities=(),
        max_retries=3,
        timeout_seconds=None,
        retry_backoff_seconds=1.0,
        metadata={},
        workflow=None,
        submitted_by="key:k1",
    )


class Feed:
    def __init__(self, labels: LabelBudget | None = None) -> None:
        self.registry = CollectorRegistry()
        self.metrics = EventMetrics(self.registry, labels or LabelBudget())
        self.seq = 0

    def __call__(
        self, event: Event, task_id: str = "t1", org: str = "acme", actor: str = "key:k1", stored: datetime = T0
    ) -> None:
        self.seq += 1
        self.metrics.fold(RecordedEvent(self.seq, f"cp.{org}.task.{task_id}", event, stored, actor=actor))  # type: ignore[arg-type]

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def test_a_repeated_submit_counts_once_and_a_stale_lease_timer_expires_nothing() -> None:
    feed = Feed()
    feed(submitted("t1"))
    feed(submitted("t1"))  # the fold ignores it: the task exists
    first_expiry = T0 + timedelta(seconds=30)
    feed(TaskClaimed(at=T0, worker_id="w", lease_id="l1", lease_seconds=30, lease_expires_at=first_expiry, attempt=1))
    renewed = T0 + timedelta(seconds=60)
    feed(TaskHeartbeat(at=T0 + timedelta(seconds=20), worker_id="w", lease_id="l1", lease_expires_at=renewed))
    late = timedelta(seconds=2)
    feed(TaskLeaseExpired(at=first_expiry, lease_id="l1"), actor=TIMER_ACTOR, stored=first_expiry + late)
    pair = {"org": "acme", "queue": "q"}
    assert feed.value("cp_tasks_submitted_total", **pair) == 1
    assert feed.value("cp_task_lease_expiries_total", **pair) == 0, "the heartbeat moved the lease on"
    assert feed.value("cp_timer_lateness_seconds_count", timer="TaskLeaseExpired") == 1, "yet the timer fired"
    assert feed.value("cp_timer_lateness_seconds_sum", timer="TaskLeaseExpired") == late.total_seconds()

    feed(TaskLeaseExpired(at=renewed, lease_id="l1"), actor=TIMER_ACTOR, stored=renewed)
    assert feed.value("cp_task_lease_expiries_total", **pair) == 1
    assert feed.value("cp_task_retries_total", **pair, reason="lease_expired") == 1
    assert feed.value("cp_tasks_finished_total", **pair, outcome="timed_out") == 0, "retries were left"


def test_a_task_from_the_snapshot_is_timed_from_its_submit() -> None:
    feed = Feed()
    snapshot = TASK.evolve(None, submitted("t9", at=T0))
    assert snapshot is not None
    feed.metrics.seed("acme", snapshot, 7)
    feed.seq = 7
    feed(TaskCancelled(at=T0 + timedelta(seconds=42), by="key:k1", reason=None), task_id="t9")
    pair = {"org": "acme", "queue": "q"}
    assert feed.value("cp_tasks_finished_total", **pair, outcome="cancelled") == 1
    assert feed.value("cp_task_duration_seconds_sum", **pair) == 42
    assert feed.value("cp_tasks_submitted_total", **pair) == 0, "submitted before this process looked"
    feed(TaskCancelled(at=T0 + timedelta(seconds=50), by="key:k1", reason=None), task_id="t9")
    assert feed.value("cp_tasks_finished_total", **pair, outcome="cancelled") == 1, "a closed task is forgotten"


def test_past_the_budget_everything_is_counted_under_other() -> None:
    feed = Feed(LabelBudget(max_orgs=2, max_queues_per_org=2, max_pairs=3))
    for n, (org, queue) in enumerate(
        [("a", "q1"), ("a", "q2"), ("a", "q3"), ("b", "q1"), ("b", "q2"), ("c", "q1"), ("d", "q9")]
    ):
        feed(submitted(f"t{n}", queue=queue, org=org), task_id=f"t{n}", org=org)
    counted = {
        (labels["org"], labels["queue"]): sample.value
        for family in feed.registry.collect()
        if family.name == "cp_tasks_submitted"
        for sample in family.samples
        if sample.name.endswith("_total")
        for labels in [sample.labels]
    }
    assert counted == {
        ("a", "q1"): 1,
        ("a", "q2"): 1,
        ("a", OTHER): 1,  # a third queue of a: past its two
        ("b", "q1"): 1,  # the third pair, the last the budget names
        ("b", OTHER): 1,
        (OTHER, OTHER): 2,  # c and d: past the two orgs
    }
