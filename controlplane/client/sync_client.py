"""The blocking client: the operations of :mod:`controlplane.client.operations` over ``httpx.Client``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import httpx

from controlplane.client.drivers import SyncDriver
from controlplane.client.models import Approval, Claim, Event, Lease, Task, Worker
from controlplane.client.operations import Operations
from controlplane.client.transport import RETRY_BUDGET_SECONDS


class Client:
    """``Client(base_url, api_key=...)``; a context manager, or call :meth:`close`. ``timeout`` bounds
    each request's connect and reads (long-polls and streams set their own); ``retry_seconds`` is how
    long a request keeps retrying transient failures before raising ``Unavailable``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retry_seconds: float = RETRY_BUDGET_SECONDS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout, transport=transport
        )
        self._driver = SyncDriver(http)
        self._ops = Operations(retry_seconds)
        self.approvals = Approvals(self._driver, self._ops)
        self.signals = Signals(self._driver, self._ops)
        self.workers = Workers(self._driver, self._ops)

    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def submit(self, type: str, payload: Any = None, **fields: Any) -> Task:
        """Submits a task; ``fields`` are the other fields of ``POST /v1/tasks`` (queue, priority,
        required_capabilities, max_retries, timeout_seconds, metadata, workflow...)."""
        return self._driver.run(self._ops.submit(type, payload, fields))

    def get(self, task_id: str) -> Task:
        return self._driver.run(self._ops.get(task_id))

    def list(self, **filters: Any) -> Iterator[Task]:
        """Every task matching ``filters`` (status, queue, priority, workflow, ``limit`` per page), page
        after page; ``min_seq``: at least as of that stream sequence (the ``seq`` another client's write
        returned). This client's own writes are always shown."""
        return self._driver.iterate(self._ops.list_tasks(filters))

    def cancel(self, task_id: str, reason: str | None = None) -> Task:
        return self._driver.run(self._ops.cancel(task_id, reason))

    def resume(self, task_id: str) -> Task:
        return self._driver.run(self._ops.resume(task_id))

    def wait_for_result(self, task_id: str, timeout: float = 60.0) -> Task:
        """The task once it is terminal; ``TimeoutError`` if it is not within ``timeout`` seconds."""
        return self._driver.run(self._ops.wait_for_result(task_id, timeout))

    def stream(
        self,
        task_id: str | None = None,
        after: int | None = None,
        *,
        types: Iterable[str] | None = None,
        queue: str | None = None,
    ) -> Iterator[Event]:
        """The task's events, or the org's without ``task_id`` (optionally only ``types`` or one
        ``queue``), after the stream sequence ``after``, following live; reconnects after the last event
        seen. Endless: stop by leaving the loop."""
        return self._driver.iterate(self._ops.stream(task_id, after, types, queue))


class Approvals:
    def __init__(self, driver: SyncDriver, ops: Operations) -> None:
        self._driver, self._ops = driver, ops

    def pending(self, task_id: str | None = None, min_seq: int | None = None) -> Iterator[Approval]:
        """Every pending approval of the org (or of one task); ``min_seq``: at least as of that stream
        sequence (the ``seq`` another client's write returned)."""
        return self._driver.iterate(self._ops.pending_approvals(task_id, min_seq))

    def get(self, approval_id: str) -> Approval:
        return self._driver.run(self._ops.get_approval(approval_id))

    def approve(self, approval_id: str, comment: str | None = None, response: Any = None) -> Approval:
        return self._driver.run(self._ops.approve(approval_id, comment, response))

    def reject(self, approval_id: str, reason: str, response: Any = None) -> Approval:
        return self._driver.run(self._ops.reject(approval_id, reason, response))


class Signals:
    def __init__(self, driver: SyncDriver, ops: Operations) -> None:
        self._driver, self._ops = driver, ops

    def send(self, task_id: str, name: str, payload: Any = None) -> int:
        """Sends the signal ``name`` to the task's workflow; returns the stream sequence it was recorded at."""
        return self._driver.run(self._ops.send_signal(task_id, name, payload))


class Workers:
    def __init__(self, driver: SyncDriver, ops: Operations) -> None:
        self._driver, self._ops = driver, ops

    def register(
        self, worker_id: str, queue: str = "default", capabilities: Iterable[str] = (), **fields: Any
    ) -> Worker:
        """Registers (or re-registers) a worker; ``fields`` are labels, model, provider, incarnation (this
        process's by default: a new process registering releases the leases its predecessor held)."""
        return self._driver.run(self._ops.register_worker(worker_id, queue, capabilities, fields))

    def deregister(self, worker_id: str) -> None:
        """Removes the worker's record (DELETE /v1/workers/{id}); ``NotFound`` if there is none."""
        return self._driver.run(self._ops.deregister_worker(worker_id))

    def heartbeat(self, worker_id: str, status: str = "ready") -> Worker:
        """``status`` is ready, busy or draining."""
        return self._driver.run(self._ops.heartbeat_worker(worker_id, status))

    def claim(
        self,
        worker_id: str,
        queue: str = "default",
        capabilities: Iterable[str] = (),
        *,
        block_ms: int = 0,
        lease_seconds: float = 30.0,
    ) -> Claim | None:
        """Claims the queue's next task whose required capabilities are among ``capabilities``, waiting
        up to ``block_ms`` (at most 30000) for one; None if none came. The :class:`Claim` holds the task
        and its lease for ``lease_seconds``: renew it with :meth:`heartbeat_lease` before it runs out."""
        return self._driver.run(self._ops.claim(worker_id, queue, capabilities, block_ms, lease_seconds))

    def heartbeat_lease(self, claim: Claim, *, progress: Any = None, lease_seconds: float | None = None) -> Lease:
        """Renews the claim's lease (for ``lease_seconds``, else as long as claimed) and records
        ``progress`` (any JSON) if given; returns the renewed lease. ``Conflict`` if the lease was lost."""
        return self._driver.run(self._ops.heartbeat_lease(claim, lease_seconds, progress))

    def complete(self, claim: Claim, result: Any = None) -> Task:
        """Completes the claimed task with ``result`` (any JSON); returns the completed task."""
        return self._driver.run(self._ops.complete(claim, result))

    def fail(self, claim: Claim, error: Any, *, retryable: bool = True) -> Task:
        """Fails the claimed task with ``error``: any JSON, or an exception (sent as ``{"type",
        "message"}``). Retryable, the task goes back to ``pending`` while it has retries left."""
        return self._driver.run(self._ops.fail(claim, error, retryable))

    def request_approval(self, claim: Claim, reason: str, **fields: Any) -> Approval:
        """Asks a human to approve ``reason``; ``fields`` are details, form, approvers, quorum,
        timeout_seconds. The lease is released: once decided, the task is pending again, and the worker
        that claims it reads the decision from ``task.approvals``."""
        return self._driver.run(self._ops.request_approval(claim, reason, fields))

    def run(
        self,
        worker_id: str,
        handler: Callable[[Task], Any],
        *,
        queue: str = "default",
        capabilities: Iterable[str] = (),
        block_ms: int = 5000,
        lease_seconds: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        """Works tasks until ``stop`` is set: claims one, calls ``handler(task)`` (in a thread, while the
        lease is renewed), completes the task with the return value or fails it with the exception.
        ``stop`` is looked at between claims, so stopping takes up to ``block_ms``."""
        should_stop = stop.is_set if stop is not None else lambda: False
        self._driver.run(
            self._ops.work(
                worker_id,
                handler,
                queue=queue,
                capabilities=capabilities,
                block_ms=block_ms,
                lease_seconds=lease_seconds,
                should_stop=should_stop,
            )
        )
