"""The API, described once: every method returns an operation (see :mod:`controlplane.client.transport`)
that :class:`~controlplane.client.Client` runs with blocking I/O and
:class:`~controlplane.client.AsyncClient` with asyncio. Requests are built, answers decoded, pages
followed, event streams resumed and the worker loop driven here and nowhere else."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from controlplane.client.errors import Conflict, ProblemError, Unavailable
from controlplane.client.models import Accepted, Approval, Claim, Event, Lease, Page, Task, Worker
from controlplane.client.transport import (
    RETRY_BUDGET_SECONDS,
    TRANSIENT_STATUSES,
    Call,
    Close,
    Emit,
    Feed,
    Finished,
    Join,
    Op,
    Open,
    ReadLine,
    Sleep,
    Start,
    backoff_delay,
    exchange,
    raise_for_problem,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ENDING_EVENTS = frozenset({"TaskCompleted", "TaskFailed", "TaskCancelled", "TaskTimedOut"})
"""Events after which a task may be terminal (a failure may also be retried: the task itself says)."""
FEED_IDLE_SECONDS = 45.0
"""The server sends a keepalive comment every 15 s: a stream silent three times as long is dead."""
MAX_WAIT_SECONDS = 60
"""The longest ``?wait_seconds=`` the server takes."""
LONG_POLL_GRACE_SECONDS = 10.0
"""How much longer than its wait a long-poll (or a claim's ``block_ms``) may take to answer."""
WORKER_HEARTBEAT_SECONDS = 10.0
"""How often the worker loop reports its worker alive (the server marks it offline after 30 s)."""
RECONNECT_SECONDS = 1.0
"""How long the worker loop waits after the server stayed unavailable for a whole retry budget."""
INCARNATION = uuid.uuid4().hex
"""Names this process in every worker registration it sends: a worker registered again from a new
process (restarted under the same id) gets the leases its old process held released at once."""


class EventParser:
    """``text/event-stream`` lines to :class:`Event` s: ``id``, ``event`` and ``data`` fields, a blank
    line ending each message, comment lines (the keepalives) skipped."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """The event ``line`` completes, if it does."""
        if not line:
            event = None
            if self._data and self._id is not None:
                data = msgspec.json.decode("\n".join(self._data), type=dict[str, Any])
                event = Event(id=int(self._id), type=self._type, data=data)
            self._id, self._type, self._data = None, "message", []
            return event
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self._id = value
        elif name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None  # a comment (empty name) or a field this API does not send


def _task_path(task_id: str) -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}"


def _error_document(error: BaseException) -> dict[str, str]:
    return {"type": type(error).__name__, "message": str(error)}


class _Renewed(msgspec.Struct):
    lease: Lease


class _Claimed(msgspec.Struct):
    task: Task
    lease: Lease


@dataclass
class _Liveness:
    """When the worker loop next owes the server a worker heartbeat."""

    worker_id: str
    due_at: float = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.due_at

    def reported(self) -> None:
        self.due_at = time.monotonic() + WORKER_HEARTBEAT_SECONDS


class _Written(msgspec.Struct):
    seq: int | None = None


class Operations:
    """Every call of the API as an operation. ``retry_seconds`` is each request's retry budget.

    Lists read the server's read model, which follows the log a moment behind: each list asks for
    ``min_seq``, the sequence of this client's last write, so it always shows what the client did."""

    def __init__(self, retry_seconds: float = RETRY_BUDGET_SECONDS) -> None:
        self.retry_seconds = retry_seconds
        self.written_seq = 0

    def _fetch(self, call: Call, into: type[T]) -> Op[T]:
        response = yield from exchange(call, self.retry_seconds)
        raise_for_problem(response)
        if call.method == "POST":
            self._wrote(response)
        return msgspec.json.decode(response.content, type=into)

    def _wrote(self, response: httpx.Response) -> None:
        seq = msgspec.json.decode(response.content, type=_Written).seq
        self.written_seq = max(self.written_seq, seq or 0)

    def _every(self, path: str, params: Mapping[str, Any], into: Any) -> Op[None]:
        """Emits every item of every page, following ``next_cursor``. The pages show at least the log up
        to the ``min_seq`` asked for (another client's write) and this client's own writes."""
        cursor, min_seq = None, max(params.get("min_seq") or 0, self.written_seq) or None
        while True:
            call = Call.of("GET", path, params={**params, "cursor": cursor, "min_seq": min_seq})
            page = yield from self._fetch(call, into)
            for item in page.items:
                yield Emit(item)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # --- tasks ---------------------------------------------------------------------------------------

    def submit(self, task_type: str, payload: Any, fields: Mapping[str, Any]) -> Op[Task]:
        body = {"type": task_type, **fields}
        if payload is not None:
            body["payload"] = payload
        return self._fetch(Call.of("POST", "/v1/tasks", body), Task)

    def get(self, task_id: str) -> Op[Task]:
        return self._fetch(Call.of("GET", _task_path(task_id)), Task)

    def list_tasks(self, filters: Mapping[str, Any]) -> Op[None]:
        return self._every("/v1/tasks", filters, Page[Task])

    def cancel(self, task_id: str, reason: str | None) -> Op[Task]:
        body = {} if reason is None else {"reason": reason}
        return self._fetch(Call.of("POST", f"{_task_path(task_id)}/cancel", body), Task)

    def resume(self, task_id: str) -> Op[Task]:
        return self._fetch(Call.of("POST", f"{_task_path(task_id)}/resume", {}), Task)

    def wait_for_result(self, task_id: str, timeout: float) -> Op[Task]:
        """The task once terminal. Follows its event feed from the state read first (so no event is
        missed), reopening it after the last event seen when the connection drops; if the server
        refuses the feed (429: too many open streams, or 502/503/504), long-polls instead. Raises
        ``TimeoutError`` at the deadline."""
        deadline = time.monotonic() + timeout
        task = yield from self.get(task_id)
        if task.is_terminal:
            return task
        path, last, failures = f"{_task_path(task_id)}/events", task.seq, 0
        while (remaining := deadline - time.monotonic()) > 0:
            feed = None
            try:
                feed = yield from self._open_feed(path, None, last, min(remaining, FEED_IDLE_SECONDS))
                parser = EventParser()
                while (event := (yield from self._next_event(feed, parser, deadline))) is not None:
                    last, failures = event.id, 0
                    if event.type in ENDING_EVENTS:
                        task = yield from self.get(task_id)
                        if task.is_terminal:
                            return task
            except ProblemError as exc:
                if exc.status not in TRANSIENT_STATUSES:
                    raise
                log.info("task %s: the event feed is refused (%s); long-polling instead", task_id, exc)
                return (yield from self._poll_until_terminal(task, deadline, timeout))
            except httpx.TransportError as exc:  # dropped, or silent past the keepalives: reopen
                log.info("task %s: the event feed broke (%r); reopening after event %d", task_id, exc, last)
            except TimeoutError:  # the deadline passed while the feed was open
                break
            if feed is not None:
                yield Close(feed)
            yield Sleep(min(backoff_delay(failures), max(deadline - time.monotonic(), 0.0)))
            failures += 1
        raise _still_running(task, timeout)

    def _poll_until_terminal(self, task: Task, deadline: float, timeout: float) -> Op[Task]:
        while (remaining := deadline - time.monotonic()) > 0:
            wait = min(MAX_WAIT_SECONDS, int(remaining))
            if wait == 0:  # the server waits whole seconds: sleep out the fraction, then look once more
                yield Sleep(remaining)
            call = Call.of(
                "GET", _task_path(task.id), params={"wait_seconds": wait}, timeout=wait + LONG_POLL_GRACE_SECONDS
            )
            task = yield from self._fetch(call, Task)
            if task.is_terminal:
                return task
        raise _still_running(task, timeout)

    def stream(
        self, task_id: str | None, after: int | None, types: Iterable[str] | None, queue: str | None
    ) -> Op[None]:
        """Emits the events of a task's feed, or of the org's without one, after ``after`` (from the
        beginning without it), following live. A dropped connection or a transient refusal is reopened
        after the last event seen, with backoff; failing for a whole retry budget raises Unavailable."""
        if task_id is not None:
            path, params = f"{_task_path(task_id)}/events", None
        else:
            path, params = "/v1/events", {"types": None if types is None else ",".join(types), "queue": queue}
        last, failures, failing_since = after, 0, None
        while True:
            feed = None
            retry_after = None
            try:
                feed = yield from self._open_feed(path, params, last, FEED_IDLE_SECONDS)
                parser = EventParser()
                while (event := (yield from self._next_event(feed, parser))) is not None:
                    last, failures, failing_since = event.id, 0, None
                    yield Emit(event)
                failure: Exception | None = None
            except ProblemError as exc:
                if exc.status not in TRANSIENT_STATUSES:
                    raise
                failure, retry_after = exc, exc.retry_after
            except httpx.TransportError as exc:
                failure = exc
            if feed is not None:
                yield Close(feed)
            if failing_since is None:
                failing_since = time.monotonic()
            delay = backoff_delay(failures, retry_after)
            if time.monotonic() - failing_since + delay > self.retry_seconds:
                raise Unavailable(
                    503, "Service unavailable", f"GET {path}: could not reopen the event stream: {failure!r}"
                ) from failure
            log.info("GET %s: the event stream ended (%r); reopening after event %s", path, failure, last)
            yield Sleep(delay)
            failures += 1

    def _open_feed(self, path: str, params: Mapping[str, Any] | None, after: int | None, idle: float) -> Op[Feed]:
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        feed: Feed = yield Open(Call.of("GET", path, params=params, headers=headers, timeout=idle))
        raise_for_problem(feed.response)
        return feed

    def _next_event(self, feed: Feed, parser: EventParser, deadline: float | None = None) -> Op[Event | None]:
        """The feed's next event; None when the server ended the stream, ``TimeoutError`` at ``deadline``
        (a ``time.monotonic()`` time)."""
        while True:
            line = yield ReadLine(feed, None if deadline is None else max(deadline - time.monotonic(), 0.0))
            if line is None:
                return None
            if (event := parser.feed(line)) is not None:
                return event

    # --- approvals and signals -----------------------------------------------------------------------

    def pending_approvals(self, task_id: str | None, min_seq: int | None) -> Op[None]:
        params = {"status": "pending", "task_id": task_id, "min_seq": min_seq}
        return self._every("/v1/approvals", params, Page[Approval])

    def get_approval(self, approval_id: str) -> Op[Approval]:
        return self._fetch(Call.of("GET", f"/v1/approvals/{quote(approval_id, safe='')}"), Approval)

    def approve(self, approval_id: str, comment: str | None, response: Any) -> Op[Approval]:
        body = {name: value for name, value in (("comment", comment), ("response", response)) if value is not None}
        return self._fetch(Call.of("POST", f"/v1/approvals/{quote(approval_id, safe='')}/approve", body), Approval)

    def reject(self, approval_id: str, reason: str, response: Any) -> Op[Approval]:
        body = {"reason": reason} if response is None else {"reason": reason, "response": response}
        return self._fetch(Call.of("POST", f"/v1/approvals/{quote(approval_id, safe='')}/reject", body), Approval)

    def send_signal(self, task_id: str, name: str, payload: Any) -> Op[int]:
        body = {"name": name} if payload is None else {"name": name, "payload": payload}
        accepted = yield from self._fetch(Call.of("POST", f"{_task_path(task_id)}/signals", body), Accepted)
        return accepted.seq

    # --- workers -------------------------------------------------------------------------------------

    def register_worker(
        self, worker_id: str, queue: str, capabilities: Iterable[str], fields: Mapping[str, Any]
    ) -> Op[Worker]:
        body = {
            "worker_id": worker_id,
            "queue": queue,
            "capabilities": list(capabilities),
            "incarnation": INCARNATION,
            **fields,
        }
        return self._fetch(Call.of("POST", "/v1/workers", body), Worker)

    def deregister_worker(self, worker_id: str) -> Op[None]:
        response = yield from exchange(
            Call.of("DELETE", f"/v1/workers/{quote(worker_id, safe='')}"), self.retry_seconds
        )
        raise_for_problem(response)

    def heartbeat_worker(self, worker_id: str, status: str) -> Op[Worker]:
        path = f"/v1/workers/{quote(worker_id, safe='')}/heartbeat"
        return self._fetch(Call.of("POST", path, {"status": status}), Worker)

    def claim(
        self, worker_id: str, queue: str, capabilities: Iterable[str], block_ms: int, lease_seconds: float
    ) -> Op[Claim | None]:
        """A claimed task and its lease, or None if nothing matched within ``block_ms``."""
        body = {
            "worker_id": worker_id,
            "queue": queue,
            "capabilities": list(capabilities),
            "block_ms": block_ms,
            "lease_seconds": lease_seconds,
        }
        call = Call.of("POST", "/v1/tasks/claim", body, timeout=block_ms / 1000 + LONG_POLL_GRACE_SECONDS)
        response = yield from exchange(call, self.retry_seconds)
        if response.status_code == 204:
            return None
        raise_for_problem(response)
        self._wrote(response)
        claimed = msgspec.json.decode(response.content, type=_Claimed)
        return Claim(task=claimed.task, lease=claimed.lease, worker_id=worker_id)

    def _under_lease(self, claim: Claim, action: str, fields: Mapping[str, Any], into: type[T]) -> Op[T]:
        """A command only the claim's holder may send: it names the worker and the lease."""
        body = {"worker_id": claim.worker_id, "lease_id": claim.lease.id, **fields}
        return self._fetch(Call.of("POST", f"{_task_path(claim.task.id)}/{action}", body), into)

    def heartbeat_lease(self, claim: Claim, lease_seconds: float | None, progress: Any) -> Op[Lease]:
        optional = (("lease_seconds", lease_seconds), ("progress", progress))
        fields = {name: value for name, value in optional if value is not None}
        renewed = yield from self._under_lease(claim, "heartbeat", fields, _Renewed)
        return renewed.lease

    def complete(self, claim: Claim, result: Any) -> Op[Task]:
        return self._under_lease(claim, "complete", {"result": result}, Task)

    def fail(self, claim: Claim, error: Any, retryable: bool) -> Op[Task]:
        """An exception as ``error`` is sent as ``{"type", "message"}``; anything else as it is (JSON)."""
        document = _error_document(error) if isinstance(error, BaseException) else error
        return self._under_lease(claim, "fail", {"error": document, "retryable": retryable}, Task)

    def request_approval(self, claim: Claim, reason: str, fields: Mapping[str, Any]) -> Op[Approval]:
        return self._under_lease(claim, "approval-requests", {"reason": reason, **fields}, Approval)

    def work(
        self,
        worker_id: str,
        handler: Callable[[Task], Any],
        *,
        queue: str,
        capabilities: Iterable[str],
        block_ms: int,
        lease_seconds: float,
        should_stop: Callable[[], bool],
    ) -> Op[None]:
        """The worker loop: registers, then until ``should_stop()`` claims a task (waiting up to
        ``block_ms`` for one), runs ``handler(task)`` while renewing the lease, and completes the task
        with what it returned or fails it (retryable) with what it raised. Reports the worker alive
        meanwhile, and ``draining`` at the end. A server unavailable for a whole retry budget is waited
        out; a lost lease drops that task's outcome (another worker owns the task now)."""
        capabilities = list(capabilities)
        yield from self.register_worker(worker_id, queue, capabilities, {})
        liveness = _Liveness(worker_id)
        while not should_stop():
            try:
                yield from self._report(liveness, "ready")
                claim = yield from self.claim(worker_id, queue, capabilities, block_ms, lease_seconds)
                if claim is not None:
                    yield from self._handle(claim, handler, lease_seconds, liveness)
            except Unavailable as exc:
                log.warning("worker %s: %s; retrying in %.0f s", worker_id, exc, RECONNECT_SECONDS)
                yield Sleep(RECONNECT_SECONDS)
        yield from self.heartbeat_worker(worker_id, "draining")

    def _report(self, liveness: _Liveness, status: str) -> Op[None]:
        if liveness.due():
            yield from self.heartbeat_worker(liveness.worker_id, status)
            liveness.reported()

    def _handle(
        self, claim: Claim, handler: Callable[[Task], Any], lease_seconds: float, liveness: _Liveness
    ) -> Op[None]:
        job = yield Start(handler, claim.task)
        held = True
        while (finished := (yield Join(job, lease_seconds / 3))) is None:
            if held:
                try:
                    yield from self.heartbeat_lease(claim, lease_seconds, None)
                except Conflict as exc:  # the handler runs on (a thread cannot be stopped); its outcome is dropped
                    log.warning(
                        "task %s: the lease is lost (%s); its outcome will be dropped", claim.task.id, exc.detail
                    )
                    held = False
            yield from self._report(liveness, "busy")
        if held:
            yield from self._report_outcome(claim, finished)

    def _report_outcome(self, claim: Claim, finished: Finished) -> Op[None]:
        """Completes the task with what the handler returned, or fails it (retryable) with what it
        raised; a return value that is not JSON is the handler's failure too."""
        try:
            error = finished.error
            if error is None:
                try:
                    yield from self.complete(claim, finished.value)
                    return
                except (TypeError, msgspec.EncodeError) as exc:  # raised while encoding, before sending
                    error = exc
            log.warning("task %s: the handler failed (%r); failing the task", claim.task.id, error)
            yield from self.fail(claim, error, retryable=True)
        except Conflict as exc:
            log.warning("task %s: the lease is lost (%s); its outcome is dropped", claim.task.id, exc.detail)


def _still_running(task: Task, timeout: float) -> TimeoutError:
    return TimeoutError(f"task {task.id} is still {task.status} after {timeout:g} s")
