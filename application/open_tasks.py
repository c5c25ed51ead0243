"""The open tasks, folded: which tasks wait for a worker, in claim order (highest priority first, then
oldest), whether a worker may take one (its capabilities, ``workflows_only``, ``excluded_workers``), how
many are in flight per org and queue, and how many leases each worker holds. Pure: the claim index
(``application/claim_index.py``) feeds it the read model's snapshot, then the log's task events, each
with its stream sequence."""

from __future__ import annotations

from bisect import insort
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from core.domain.events import PRIORITY_RANK, TaskLeaseExpired, TaskSubmitted
from core.domain.records import RecordedEvent
from core.domain.subjects import parse_aggregate_subject
from core.domain.task import Task
from core.domain.task_decider import TASK

ClaimOrder = tuple[int, datetime, str]
"""Highest priority first, then oldest, then by id so the order is total."""


def claim_order(task: Task) -> ClaimOrder:
    return (PRIORITY_RANK[task.priority], task.created_at, task.id)


def fits(task: Task, capabilities: frozenset[str], *, workflows_only: bool, worker_id: str | None) -> bool:
    """Whether a worker with ``capabilities`` (``worker_id``, if known) may take ``task`` once it is due."""
    return (
        capabilities.issuperset(task.required_capabilities)
        and (task.workflow is not None or not workflows_only)
        and (worker_id is None or worker_id not in task.excluded_workers)
    )


def _waiting_for_a_worker(task: Task) -> bool:
    """Pending, and neither parked nor waiting for a signal (its workflow would only wait again: the
    task opens up when the signal, or the wait's timeout, comes)."""
    return task.status == "pending" and task.parked is None and task.signal_wait is None


class OpenTasks:
    """The open tasks and, per org and queue, those waiting for a worker in claim order. Pure: the
    caller feeds it states or events in log order, each with its stream sequence."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], tuple[Task, int]] = {}
        self._waiting: dict[tuple[str, str], list[ClaimOrder]] = {}
        self._open_in: Counter[tuple[str, str | None]] = Counter()
        """Open tasks per (org, queue), and per (org, None) for the whole org: what quotas count."""
        self._held: Counter[tuple[str, str]] = Counter()
        """Leases each (org, worker id) holds: what ``least_loaded`` compares."""

    def __len__(self) -> int:
        return len(self._tasks)

    def in_flight(self, org: str, queue: str | None = None) -> int:
        """Tasks of ``org`` (on ``queue``, if given) pending, running or awaiting approval."""
        return self._open_in[(org, queue)]

    def leases_held(self, org: str, worker_id: str) -> int:
        return self._held[(org, worker_id)]

    def task(self, org: str, task_id: str) -> Task | None:
        known = self._tasks.get((org, task_id))
        return None if known is None else known[0]

    def put(self, org: str, task: Task, seq: int) -> bool:
        """Take ``task`` as its state at ``seq`` unless a later one is known. True when the task now
        waits for a worker, so claimers of its queue should look again. A closed task is forgotten:
        offering an older state of it afterwards would open it again, so callers must not."""
        known = self._tasks.get((org, task.id))
        if known is not None:
            if known[1] >= seq:
                return False
            self._unlist(org, known[0])
            self._hold(org, known[0], -1)
        if task.is_terminal:
            if self._tasks.pop((org, task.id), None) is not None:
                self._count(org, task.queue, -1)
            return False
        if known is None:
            self._count(org, task.queue, +1)
        self._tasks[(org, task.id)] = (task, seq)
        self._hold(org, task, +1)
        if _waiting_for_a_worker(task):
            insort(self._waiting.setdefault((org, task.queue), []), claim_order(task))
            return True
        return False

    def lease_expired(self, recorded: RecordedEvent) -> tuple[str, str, str] | None:
        """``(org, worker id, task id)`` when ``recorded`` expires the lease a worker holds (call it
        before :meth:`fold` of the same event); None for anything else, a stale timer included."""
        if not isinstance(recorded.event, TaskLeaseExpired):
            return None
        address = parse_aggregate_subject(recorded.subject)
        known = self._tasks.get((address.org, address.id))
        if known is None or recorded.seq <= known[1]:
            return None
        lease = known[0].lease
        if lease is None or lease.id != recorded.event.lease_id:
            return None
        return address.org, lease.worker_id, address.id

    def fold(self, recorded: RecordedEvent) -> tuple[str, Task] | None:
        """Apply one task event; ``(org, task)`` when the task now waits for a worker."""
        address = parse_aggregate_subject(recorded.subject)
        known = self._tasks.get((address.org, address.id))
        if known is None and not isinstance(recorded.event, TaskSubmitted):
            return None  # the task was closed before our snapshot: nothing to claim
        if known is not None and recorded.seq <= known[1]:
            return None
        task = TASK.evolve(None if known is None else known[0], recorded.event)
        if task is None or not self.put(address.org, task, recorded.seq):
            return None
        return address.org, task

    def candidates(
        self,
        org: str,
        queue: str,
        capabilities: Sequence[str],
        now: datetime,
        limit: int,
        *,
        workflows_only: bool = False,
        worker_id: str | None = None,
    ) -> list[str]:
        """Up to ``limit`` ids a worker with ``capabilities`` may claim now, best first; with
        ``workflows_only``, only tasks that run a workflow; with ``worker_id``, none that excludes it."""
        offered = frozenset(capabilities)
        found: list[str] = []
        for _, _, task_id in self._waiting.get((org, queue), ()):
            task = self._tasks[(org, task_id)][0]
            due = task.not_before is None or task.not_before <= now
            if due and fits(task, offered, workflows_only=workflows_only, worker_id=worker_id):
                found.append(task_id)
                if len(found) == limit:
                    break
        return found

    def _count(self, org: str, queue: str, change: int) -> None:
        for key in ((org, queue), (org, None)):
            self._open_in[key] += change
            if not self._open_in[key]:
                del self._open_in[key]

    def _hold(self, org: str, task: Task, change: int) -> None:
        if task.lease is None or task.is_terminal:
            return
        key = (org, task.lease.worker_id)
        self._held[key] += change
        if not self._held[key]:
            del self._held[key]

    def _unlist(self, org: str, task: Task) -> None:
        if not _waiting_for_a_worker(task):
            return
        waiting = self._waiting[(org, task.queue)]
        waiting.remove(claim_order(task))
        if not waiting:
            del self._waiting[(org, task.queue)]
