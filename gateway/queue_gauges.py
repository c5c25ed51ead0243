"""The operator gauges read from the read model at scrape time (ADR 0009, docs/operations.md): queue
depth, the oldest claimable task, approvals pending and the oldest of them, parked tasks. One bounded
system query (``ReadModel.queue_summary``), its answer cached for a few seconds and shared by concurrent
scrapes, so scraping cannot load PostgreSQL. Labels are bounded by ``gateway.metrics.LabelBudget``, as
the counters folded from the log are."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.metrics import OTHER, LabelBudget
from projections.read.summary import QueueSummary

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 3.0
"""How long a scrape waits for the queue summary before serving the rest without it."""


class ReadsQueues(Protocol):
    async def queue_summary(self, limit: int) -> list[QueueSummary]: ...


@dataclass
class _Row:
    pending: int = 0
    running: int = 0
    awaiting_approval: int = 0
    parked: int = 0
    approvals_pending: int = 0
    oldest_waiting_since: datetime | None = None
    oldest_approval_since: datetime | None = None

    def add(self, row: QueueSummary) -> None:
        self.pending += row.pending
        self.running += row.running
        self.awaiting_approval += row.awaiting_approval
        self.parked += row.parked
        self.approvals_pending += row.approvals_pending
        self.oldest_waiting_since = _earliest(self.oldest_waiting_since, row.oldest_waiting_since)
        self.oldest_approval_since = _earliest(self.oldest_approval_since, row.oldest_approval_since)


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


class QueueGauges(Collector):
    """The gauges read from the read model, registered as a collector: ``refresh`` (async, before a
    scrape renders) reads at most once per ``ttl`` seconds, whatever the number of scrapes and
    gateways' scrapers; rendering is then synchronous, from the cached answer. Ages are computed at
    rendering, so a cached answer still shows them growing. A label pair this process has shown
    before stays, at 0, when its queue empties: a graph drops to zero instead of ending."""

    def __init__(self, registry: CollectorRegistry, labels: LabelBudget, ttl: float) -> None:
        self._labels, self._ttl = labels, ttl
        self._rows: dict[tuple[str, str], _Row] | None = None
        self._shown: set[tuple[str, str]] = set()
        self._read_at: float | None = None
        self._lock = asyncio.Lock()
        self.queries = Counter(
            "cp_metrics_read_model_queries",
            "Queries the metrics endpoint made to the read model, by result",
            ["result"],
            registry=registry,
        )
        registry.register(self)

    async def refresh(self, read_model: ReadsQueues) -> None:
        """Read the summary again unless the last read (or failed read) is younger than ``ttl``."""
        if self._fresh():
            return
        async with self._lock:
            if self._fresh():  # a concurrent scrape read it while this one waited
                return
            try:
                # Bounded beyond the statement timeout: acquiring a connection to a dead server may hang.
                async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                    summary = await read_model.queue_summary(self._labels.max_pairs)
            except Exception as exc:  # the gauges go missing, the rest of /metrics stays served
                log.warning("metrics: reading the queue summary failed: %r", exc)
                self.queries.labels("error").inc()
                self._rows = None
            else:
                self.queries.labels("ok").inc()
                self._rows = self._label(summary)
            self._read_at = time.monotonic()

    def _fresh(self) -> bool:
        return self._read_at is not None and time.monotonic() - self._read_at < self._ttl

    def _label(self, summary: Iterable[QueueSummary]) -> dict[tuple[str, str], _Row]:
        rows: dict[tuple[str, str], _Row] = {}
        # Busiest first: when the budget is fresh, the queues that matter most get their names.
        for row in sorted(summary, key=lambda r: -(r.pending + r.running + r.awaiting_approval)):
            labels = (OTHER, OTHER) if row.org is None or row.queue is None else self._labels.pair(row.org, row.queue)
            rows.setdefault(labels, _Row()).add(row)
        self._shown.update(rows)
        return rows

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families({}))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._rows is None:
            return iter(())
        rows = {labels: self._rows.get(labels, _Row()) for labels in self._shown}
        return iter(self._families(rows))

    @staticmethod
    def _families(rows: dict[tuple[str, str], _Row]) -> list[GaugeMetricFamily]:
        now = datetime.now(UTC)
        pair = ["org", "queue"]
        depth = GaugeMetricFamily("cp_queue_tasks", "Open tasks by status", labels=[*pair, "status"])
        oldest = GaugeMetricFamily(
            "cp_queue_oldest_pending_seconds",
            "How long the longest-waiting claimable task has waited for a worker (0: none waits)",
            labels=pair,
        )
        parked = GaugeMetricFamily(
            "cp_queue_tasks_parked", "Pending tasks parked after a non-deterministic replay", labels=pair
        )
        approvals = GaugeMetricFamily("cp_approvals_pending", "Approvals waiting for a human", labels=pair)
        oldest_approval = GaugeMetricFamily(
            "cp_approvals_oldest_pending_seconds", "Age of the oldest approval still waiting (0: none)", labels=pair
        )
        for (org, queue), row in sorted(rows.items()):
            for status in ("pending", "running", "awaiting_approval"):
                depth.add_metric([org, queue, status], getattr(row, status))
            oldest.add_metric([org, queue], _age(now, row.oldest_waiting_since))
            parked.add_metric([org, queue], row.parked)
            approvals.add_metric([org, queue], row.approvals_pending)
            oldest_approval.add_metric([org, queue], _age(now, row.oldest_approval_since))
        return [depth, oldest, parked, approvals, oldest_approval]


def _age(now: datetime, since: datetime | None) -> float:
    return 0.0 if since is None else max((now - since).total_seconds(), 0.0)


def cache_seconds() -> float:
    """``CP_METRICS_CACHE_SECONDS``: how long one read of the queue summary serves scrapes (5 s)."""
    return float(os.environ.get("CP_METRICS_CACHE_SECONDS", "5"))
