"""The runner process: registers as a worker that hosts some workflows, claims their tasks, replays
each task's journal and continues it. Heartbeats keep the lease while a step runs; a runner that dies
simply stops heartbeating, the lease expires, and another runner replays and finishes the task. A runner
restarted under the same worker id does not wait for that: it registers as a new incarnation, which
releases its predecessor's leases at once, and claims the tasks back.

A gateway that is briefly unavailable (429, 503, a restart) is waited out: the client retries with
backoff, and a call that still fails is never reported as the workflow's failure, so it costs no
retry of the task; the runner itself keeps claiming."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import msgspec

from core import telemetry
from core.domain.events import LlmSettings
from core.domain.ids import new_id
from runners.client import LeaseLost, TaskApi, Unavailable
from runners.context import Interrupted, NonDeterminism, PolicyDenied, Suspended, WorkflowContext
from runners.policies import Policies
from runners.registry import Registry

log = logging.getLogger(__name__)
RECONNECT_SECONDS = 1.0
CLAIM_REQUESTS_IN_FLIGHT = 2
MAX_CLAIMS_PER_REQUEST = 100
LIVENESS_SECONDS = 10.0
"""How often a runner tells the control plane it is alive: a worker silent for its heartbeat timeout
(30 s by default) is marked offline."""
UNREACHABLE = (Unavailable, httpx.TransportError)
"""The gateway could not answer (the client has already retried): wait and try again."""


class Runner:
    def __init__(
        self,
        api: TaskApi,
        registry: Registry,
        *,
        worker_id: str,
        queue: str = "default",
        concurrency: int = 4,
        lease_seconds: float = 30.0,
        block_ms: int = 5000,
        policies: Policies | None = None,
    ) -> None:
        self._api, self._registry = api, registry
        self.worker_id, self.queue = worker_id, queue
        self.incarnation = new_id()
        """Names this runner (one per process) when it registers: a runner restarted under the same
        worker id is a new incarnation, and the leases its dead predecessor held are released at once."""
        self._slots = asyncio.Semaphore(concurrency)
        self._policies = policies or Policies()
        self._owns_policies = policies is None
        self._claimers = min(concurrency, CLAIM_REQUESTS_IN_FLIGHT)
        self._lease_seconds, self._block_ms = lease_seconds, block_ms
        self._running: set[asyncio.Task[None]] = set()
        self._executing: dict[str, asyncio.Task[None]] = {}
        self._liveness_seconds = LIVENESS_SECONDS
        self._llm = LlmSettings()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run tasks until ``stop``; then drain: finish what runs (status ``draining``)."""
        capabilities = self._registry.capabilities()
        if not await self._register(stop, capabilities):
            return
        liveness = asyncio.create_task(self._report_liveness(stop))
        # Two claim requests in flight, each for every free slot: while one waits for its answer the
        # other is already asking, and a runner taking over from a crashed one resumes all at once.
        try:
            await asyncio.gather(*(self._claim_until(stop, capabilities) for _ in range(self._claimers)))
        finally:
            liveness.cancel()
        try:
            await self._api.worker_heartbeat(self.worker_id, "draining")
        except UNREACHABLE as exc:  # the runs still finish; the worker will show offline instead
            log.warning("could not report draining (%r)", exc)
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._owns_policies:
            self._policies.close()

    async def _register(self, stop: asyncio.Event, capabilities: list[str]) -> bool:
        """Register as a ready worker, however long the gateway takes to answer; False if stopped first."""
        while not stop.is_set():
            try:
                registered = await self._api.register(self.worker_id, self.queue, capabilities, self.incarnation)
                self._configure(registered.get("config") or {})
                await self._api.worker_heartbeat(self.worker_id, "ready")
                return True
            except UNREACHABLE as exc:
                log.warning("registering failed (%r); retrying in %.0f s", exc, RECONNECT_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RECONNECT_SECONDS)
        return False

    def _configure(self, config: dict[str, Any]) -> None:
        """Apply what the org set for this worker (its registration's ``config``): a setting it made
        replaces the runner's own; one it left unset (null) keeps it."""
        self._lease_seconds = config.get("lease_seconds") or self._lease_seconds
        self._liveness_seconds = config.get("heartbeat_interval_seconds") or self._liveness_seconds
        self._llm = msgspec.convert(config.get("llm") or {}, LlmSettings)

    async def _report_liveness(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._liveness_seconds)
                return
            try:
                await self._api.worker_heartbeat(self.worker_id, "ready")
            except (*UNREACHABLE, httpx.HTTPError, RuntimeError) as exc:  # the next beat will do
                log.warning("worker heartbeat failed (%r); retrying in %.0f s", exc, self._liveness_seconds)

    async def _claim_until(self, stop: asyncio.Event, capabilities: list[str]) -> None:
        while not stop.is_set():
            await self._slots.acquire()
            free = 1
            while free < MAX_CLAIMS_PER_REQUEST and not self._slots.locked():
                await self._slots.acquire()
                free += 1
            claimed = []
            try:
                claimed = await self._api.claim(
                    self.worker_id, self.queue, capabilities, self._block_ms, self._lease_seconds, free
                )
            except UNREACHABLE as exc:  # the gateway restarts, is unreachable or overloaded: keep trying
                log.warning("claim failed (%r); retrying in %.0f s", exc, RECONNECT_SECONDS)
                await asyncio.sleep(RECONNECT_SECONDS)
            finally:
                for _ in range(free - len(claimed)):
                    self._slots.release()
            for item in claimed:
                job = asyncio.create_task(self._execute(item["task"], item["lease"]["id"], item.get("trace")))
                self._running.add(job)
                job.add_done_callback(self._running.discard)

    async def _execute(self, task: dict[str, Any], lease_id: str, trace: dict[str, Any] | None = None) -> None:
        """Run the claimed task in its own log context (org, task id, the submit's correlation id) and,
        with tracing on, in a span that continues the trace its submit started (``trace`` is what the
        claim answered): every call made for it, the lease's heartbeats too, carries both on."""
        trace = trace or {}
        workflow = task.get("workflow") or {}
        with (
            telemetry.bound(org=task.get("org"), task_id=task["id"], correlation_id=trace.get("correlation_id")),
            telemetry.span(
                f"workflow {workflow.get('name')}",
                {
                    "cp.org": task.get("org"),
                    "cp.task_id": task["id"],
                    "cp.workflow": workflow.get("name"),
                    "cp.workflow_version": workflow.get("version"),
                    "cp.worker_id": self.worker_id,
                    "cp.replayed_operations": len(task.get("journal") or ()),
                },
                parent=trace.get("traceparent"),
            ),
        ):
            await self._run_claimed(task, lease_id)

    async def _run_claimed(self, task: dict[str, Any], lease_id: str) -> None:
        """Run the workflow while the lease is renewed beside it. If renewing fails the lease is gone:
        the run stops at once rather than keep working on a task another runner may now own."""
        lease = {"worker_id": self.worker_id, "lease_id": lease_id}
        previous = self._executing.pop(task["id"], None)
        if previous is not None:  # our older run of this task lost its lease: never run a task twice
            previous.cancel()
        work = asyncio.create_task(self._advance(task, lease))
        self._executing[task["id"]] = work
        renewing = asyncio.create_task(self._keep_lease(task["id"], lease))
        try:
            await asyncio.wait({work, renewing}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
            await work
        except asyncio.CancelledError:
            log.warning("task %s: stopped; its lease was lost (%s)", task["id"], _why(renewing))
        except LeaseLost as exc:
            log.warning("task %s: lease lost (%s); another runner continues it", task["id"], exc)
        except Unavailable as exc:  # not the workflow's failure: nothing is reported
            log.warning("task %s: the gateway stayed unavailable (%s); a later claim continues it", task["id"], exc)
        except Exception:
            log.exception("task %s: the runtime failed; the lease will expire and the task be retried", task["id"])
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewing
            if self._executing.get(task["id"]) is work:
                del self._executing[task["id"]]
            self._slots.release()

    async def _advance(self, task: dict[str, Any], lease: dict[str, str]) -> None:
        ref = task["workflow"]  # runners claim only tasks that run a workflow
        found = self._registry.find(ref["name"], ref["version"])
        if found is None:
            await self._api.lease_call(task["id"], "fail", {**lease, "error": f"no workflow {ref}", "retryable": False})
            return
        context = WorkflowContext(
            self._api, task, lease["lease_id"], self.worker_id, policies=self._policies, llm=self._llm
        )
        # One line per claim and one per outcome: the task id, org and correlation id come with the context.
        log.info("running workflow %s v%s, replaying %d operations", found.name, found.version, len(task["journal"]))
        try:
            result = await found.fn(context, task["payload"])
        except Suspended as exc:
            log.info("workflow %s suspended: %s", found.name, exc)
            telemetry.annotate({"cp.workflow.outcome": "suspended", "cp.workflow.suspended": str(exc)})
            return
        except Interrupted as exc:  # the lease is lost or the gateway unreachable: report nothing
            raise exc.reason from None
        except NonDeterminism as exc:
            log.error("task %s parked: %s", task["id"], exc)
            await self._api.lease_call(
                task["id"],
                "non-determinism",
                {**lease, "index": exc.index, "expected": exc.expected, "actual": exc.actual},
            )
            return
        except (LeaseLost, Unavailable):
            raise
        except PolicyDenied as exc:  # retrying would be denied again (a declined question: asked again)
            log.warning("task %s: %s", task["id"], exc)
            error = {"type": type(exc).__name__, "message": str(exc), "reasons": exc.reasons}
            await self._api.lease_call(task["id"], "fail", {**lease, "error": error, "retryable": False})
            return
        except Exception as exc:  # the workflow's own failure: retried with backoff by the task's rules
            log.warning("task %s: workflow %s raised %r; reporting a retryable failure", task["id"], found.name, exc)
            await self._api.lease_call(
                task["id"], "fail", {**lease, "error": {"type": type(exc).__name__, "message": str(exc)}}
            )
            return
        await self._api.lease_call(task["id"], "complete", {**lease, "result": result})
        log.info("workflow %s completed", found.name)
        telemetry.annotate({"cp.workflow.outcome": "completed"})

    async def _keep_lease(self, task_id: str, lease: dict[str, str]) -> None:
        """Returns (or raises) only when the lease can no longer be renewed."""
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            await self._api.lease_call(task_id, "heartbeat", lease)


def _why(renewing: asyncio.Task[None]) -> str:
    if not renewing.done() or renewing.cancelled():
        return "cancelled"
    return repr(renewing.exception())
