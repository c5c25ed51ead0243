"""A small pool of policy worker processes (`policies_wasm.worker`) for the evaluations that cannot be
stopped in a thread: Rego on rego-cpp.

Each worker is driven by one thread of this process, which takes the next job from a shared queue,
sends it, and waits for the reply until the job's deadline. A worker that misses it while computing
is killed by its PID (SIGKILL), so the runaway evaluation stops burning its core at once; the thread
then starts a replacement, loads the bundles used most recently into it, and takes jobs again, while
the other workers go on serving.

What counts is CPU time: at the deadline a worker that used at least half the budget of CPU since
the request (read from /proc, against the CPU time it reported with its last answer) is killed, one
that did not — starved on an overloaded machine, not running away — gets another budget, up to
`PATIENCE` budgets of wall-clock time in all. Without /proc the deadline is wall-clock time.

Nothing here runs on an event loop: callers get `concurrent.futures` futures (`asyncio.wrap_future`
them) and the pool serves any loop, or none.

Workers start on first use and stop after `idle_seconds` without a job; the pool stops them all on
`close()` or when it is garbage-collected, and a worker also exits by itself when this process does.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec

from policies_wasm import engine as engine_errors
from policies_wasm.engine import Bundle, Decision, PolicyError, PolicyEvaluationError, PolicyLoadError, PolicyTimeout
from policies_wasm.worker import Decided, Evaluate, Failed, Loaded, Missing, Ready, Reply, Request, load_request

log = logging.getLogger(__name__)

LOAD_TIMEOUT_SECONDS = 10.0
"""Compiling a bundle is not evaluating it: a generous bound, only against a compiler that hangs."""
START_TIMEOUT_SECONDS = 30.0
PATIENCE = 10
"""A worker starved of CPU is waited for at most this many budgets of wall-clock time."""
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
WARM_BUNDLES = 4
"""A replacement worker compiles this many of the bundles used last before it takes jobs."""
_SOURCE_ROOT = str(Path(__file__).resolve().parents[1])


class _Overrun(Exception):
    """The worker did not answer in time; it has been killed."""


class _WorkerExited(PolicyEvaluationError):
    """The worker process was gone (crashed, or killed by someone else) when asked."""


class _WorkerProcess:
    """One worker and the socket to it. Used by one thread only."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_SOURCE_ROOT, env.get("PYTHONPATH")]))
        with ours, theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "policies_wasm.worker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
            self._connection = Connection(ours.detach())
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Reply).decode
        self._cpu_at_rest = 0.0
        try:
            ready = self._connection.poll(START_TIMEOUT_SECONDS) and self._decode(self._connection.recv_bytes())
        except (EOFError, OSError):
            ready = False
        if not isinstance(ready, Ready):
            self.kill()
            raise PolicyEvaluationError(
                f"the policy worker process did not start (exit code {self.process.returncode}); see its stderr"
            )
        self._cpu_at_rest = ready.cpu_seconds

    def ask(self, request: Request, timeout: float, *, patience: int = PATIENCE) -> Reply:
        """The reply, or _Overrun after killing the worker when none came in time: within `timeout`
        seconds, or more while it used less than half of that in CPU time, up to `patience` times."""
        give_up = time.monotonic() + timeout * patience
        try:
            self._connection.send_bytes(self._encode(request))
            while not self._connection.poll(max(0.0, min(timeout, give_up - time.monotonic()))):
                used = self._cpu_seconds()
                if used is None or used - self._cpu_at_rest >= timeout / 2 or time.monotonic() >= give_up:
                    self.kill()
                    raise _Overrun
            reply = self._decode(self._connection.recv_bytes())
        except (EOFError, OSError) as exc:
            self.kill()
            code = self.process.returncode
            raise _WorkerExited(f"the policy worker process exited (code {code}): {exc!r}") from None
        self._cpu_at_rest = reply.cpu_seconds
        return reply

    def _cpu_seconds(self) -> float | None:
        """The worker's CPU time (user + system) so far, from /proc; None where there is none."""
        try:
            with open(f"/proc/{self.process.pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def kill(self) -> None:
        self.process.kill()  # SIGKILL by PID: rego-cpp has no way to stop an evaluation
        self.process.wait()
        self._connection.close()

    def stop(self) -> None:
        """Closing the socket makes an idle worker exit; one that does not is killed."""
        self._connection.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class _Job:
    run: Callable[[_Slot], Any]
    future: Future[Any]


class _Slot:
    """What one pool thread owns: its worker and the pool's shared state."""

    def __init__(self, pool: _PoolState) -> None:
        self.pool = pool
        self.worker: _WorkerProcess | None = None
        self.killed_for: str | None = None
        """The digest of the bundle whose overrun killed the worker: start a warm one after the job."""

    def start(self, avoid: str | None = None) -> None:
        """A fresh worker, with the bundles used last (but `avoid`) already compiled."""
        self.worker = _WorkerProcess()
        for bundle in self.pool.recent(WARM_BUNDLES, avoid=avoid):
            if self.worker is None:  # compiling one killed it: the next request starts a cold one
                return
            try:
                self.load(bundle)
            except PolicyError:  # it will fail again, for its own caller
                continue

    def ask(self, request: Request, timeout: float, *, patience: int = PATIENCE) -> Reply:
        if self.worker is None:
            self.start()
        if self.worker is None:  # warming it up killed it
            raise PolicyEvaluationError("the policy worker process could not be started")
        try:
            return self.worker.ask(request, timeout, patience=patience)
        except (_Overrun, _WorkerExited):
            self.worker = None  # killed or exited
            raise

    def load(self, bundle: Bundle) -> str:
        try:
            reply = self.ask(load_request(bundle), LOAD_TIMEOUT_SECONDS, patience=1)
        except _Overrun:
            raise PolicyLoadError(
                f"compiling bundle {bundle.origin or bundle.version} took more than {LOAD_TIMEOUT_SECONDS:g} s"
            ) from None
        if isinstance(reply, Loaded):
            self.pool.remember(bundle)
            return reply.engine
        raise _failure(reply)

    def evaluate(self, bundle: Bundle, entrypoint: str, raw_input: bytes, timeout: float) -> Decision:
        request = Evaluate(bundle.digest, entrypoint, raw_input)
        retried = False
        for _ in range(4):  # a lost worker once, the bundle missing in each worker, then the answer
            started = time.monotonic()
            try:
                reply = self.ask(request, timeout)
            except _WorkerExited:
                if retried:  # twice in a row: this request is what kills it
                    raise
                retried = True
                continue
            except _Overrun:
                self.killed_for = bundle.digest
                raise PolicyTimeout(
                    f"{entrypoint} did not finish within its budget of {timeout * 1000:g} ms (stopped after "
                    f"{(time.monotonic() - started) * 1000:.0f} ms: the worker process evaluating it was killed)"
                ) from None
            if isinstance(reply, Decided):
                self.pool.remember(bundle)
                return reply.decision
            if not isinstance(reply, Missing):
                raise _failure(reply)
            self.load(bundle)
        raise PolicyEvaluationError(f"the policy worker lost bundle {bundle.version} right after loading it")

    def replace_killed(self) -> None:
        """After an overrun was answered, and before this slot takes the next job (the other slots
        serve meanwhile)."""
        if self.killed_for is not None:
            avoid, self.killed_for = self.killed_for, None
            self.start(avoid=avoid)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None


class _Jobs:
    """One queue any thread takes from, plus one per thread (for what each worker must do itself).
    None in a thread's own queue stops it."""

    def __init__(self, threads: int) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._shared: deque[_Job] = deque()
        self._own: list[deque[_Job | None]] = [deque() for _ in range(threads)]

    def put(self, job: _Job | None, thread: int | None = None) -> None:
        with self._changed:
            if thread is None:
                assert job is not None
                self._shared.append(job)
                self._changed.notify()
            else:
                self._own[thread].append(job)
                self._changed.notify_all()  # only that thread may take it

    def stop(self) -> None:
        """Every thread stops after its current job; jobs no thread took fail."""
        with self._changed:
            abandoned = [job for own in self._own for job in own if job is not None] + list(self._shared)
            self._shared.clear()
            for own in self._own:
                own.clear()
                own.append(None)
            self._changed.notify_all()
        for job in abandoned:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(PolicyError("the policy evaluator was closed"))

    def get(self, thread: int, timeout: float) -> _Job | None:
        """The thread's own job first, else the oldest shared one; queue.Empty after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._own[thread] or self._shared, timeout):
                raise queue.Empty
            return self._own[thread].popleft() if self._own[thread] else self._shared.popleft()


class _PoolState:
    """Shared by the pool's threads; holds no reference to the RegoProcesses object, so dropping that
    object stops the threads (see weakref.finalize there)."""

    def __init__(self, threads: int, idle_seconds: float, max_bundles: int = 32) -> None:
        self.jobs = _Jobs(threads)
        self.idle_seconds = idle_seconds
        self._bundles: OrderedDict[str, Bundle] = OrderedDict()
        self._max_bundles = max_bundles
        self._lock = threading.Lock()

    def remember(self, bundle: Bundle) -> None:
        with self._lock:
            self._bundles[bundle.digest] = bundle
            self._bundles.move_to_end(bundle.digest)
            while len(self._bundles) > self._max_bundles:
                self._bundles.popitem(last=False)

    def recent(self, count: int, avoid: str) -> list[Bundle]:
        with self._lock:
            return [bundle for digest, bundle in reversed(self._bundles.items()) if digest != avoid][:count]


def _serve(pool: _PoolState, thread: int) -> None:
    slot = _Slot(pool)
    try:
        slot.start()  # ready before the first job
    except PolicyError:
        log.exception("could not start a policy worker process; trying again on the first job")
    try:
        while True:
            try:
                job = pool.jobs.get(thread, timeout=pool.idle_seconds)
            except queue.Empty:
                slot.close()
                continue
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.run(slot))
            except PolicyError as exc:
                job.future.set_exception(exc)
            except Exception as exc:
                log.exception("policy worker job failed")
                if slot.worker is not None:  # in an unknown state: start afresh
                    slot.worker.kill()
                    slot.worker = None
                job.future.set_exception(PolicyEvaluationError(f"the policy worker failed: {exc!r}"))
            try:
                slot.replace_killed()
            except PolicyError:
                log.exception("could not replace a policy worker process; trying again on the next job")
    finally:
        slot.close()


def _shutdown(pool: _PoolState) -> None:
    pool.jobs.stop()


class RegoProcesses:
    """`workers` processes, each evaluating one request at a time."""

    def __init__(self, workers: int = 2, *, idle_seconds: float = 120.0) -> None:
        self.workers = workers
        self._pool = _PoolState(workers, idle_seconds)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    def load(self, bundle: Bundle) -> list[Future[str]]:
        """Compile `bundle` in every worker (which keeps it), starting those not running yet: each
        future gives the engine's name, or PolicyLoadError."""
        return [self._submit(lambda slot: slot.load(bundle), thread) for thread in range(self.workers)]

    def evaluate(
        self,
        bundle: Bundle,
        entrypoint: str,
        raw_input: bytes,
        timeout: float,
        *,
        admit: Callable[[], None] | None = None,
    ) -> Future[Decision]:
        """Decide `entrypoint` on `raw_input` (canonical JSON) within `timeout` seconds of the worker
        receiving it, else PolicyTimeout (and the worker is replaced). `admit` runs when a worker
        takes the job and may refuse it by raising a PolicyError."""

        def run(slot: _Slot) -> Decision:
            if admit is not None:
                admit()
            return slot.evaluate(bundle, entrypoint, raw_input, timeout)

        return self._submit(run)

    def close(self) -> None:
        """Stop the workers and their threads, each after its current job; queued jobs fail."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def _submit(self, run: Callable[[_Slot], Any], thread: int | None = None) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise PolicyError("the policy evaluator is closed")
            if not self._threads:
                for index in range(self.workers):
                    started = threading.Thread(
                        target=_serve, args=(self._pool, index), name=f"policy-worker-{index}", daemon=True
                    )
                    started.start()
                    self._threads.append(started)
        self._pool.jobs.put(_Job(run, future), thread)
        return future


def _failure(reply: Reply) -> PolicyError:
    if isinstance(reply, Failed):
        kind = getattr(engine_errors, reply.error, None)
        if isinstance(kind, type) and issubclass(kind, PolicyError):
            return kind(reply.message)
        return PolicyError(f"{reply.error}: {reply.message}")
    return PolicyEvaluationError(f"unexpected reply from the policy worker: {reply!r}")
