"""Policy evaluation off the event loop, on a time budget.

`PolicyEvaluator` is what the gateway and the runners decide with: `await evaluate(bundle,
entrypoint, input, owner=org)`. Every evaluation gets `budget_ms` of wall-clock time
(`CP_POLICY_BUDGET_MS`, default 100) and is then stopped for real, by the engine's own means:

- Rego (regopy): rego-cpp releases the GIL while it evaluates but offers no way to interrupt it, so
  it runs in a small pool of worker processes (`CP_POLICY_WORKERS`, default 2); an overrun kills the
  worker by PID and a warm replacement is started (`policies_wasm.processes`).
- OPA wasm: wasmtime releases the GIL and traps on an epoch deadline, so it runs on a few threads;
  a watchdog bumps the engine's epoch at the deadline (`OpaWasmEngine.evaluate(timeout=)`).

Either way an overrun is `PolicyTimeout`. Two rules keep one owner (an org) from stalling the others:
- an owner has at most `workers - 1` evaluations running at once (at least one), so a worker is always
  left for everyone else; its further requests wait for its own;
- after an overrun, that owner's evaluations of that bundle are refused with `PolicyTimeout`, without
  running, for `quarantine_seconds` (`CP_POLICY_QUARANTINE_SECONDS`, default 5): a runaway policy
  costs the pool one budget per quarantine, however often its requests come.

A decision is a function of the bundle and the input, unless the bundle's rules read the clock, draw
random numbers or reach the network: the evaluator remembers the last `DECISION_MEMORY` decisions of
bundles whose sources call none of `IMPURE_BUILTINS`, keyed by the bundle's digest, the entrypoint and
the input's canonical JSON, and answers a repeated question without a worker. A remembered decision
is recorded as any other (its digests are the same); its `duration_ms` is 0, the time it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from policies_wasm.engine import Bundle, Decision, PolicyTimeout, canonical_json
from policies_wasm.processes import RegoProcesses
from policies_wasm.watchdog import Watchdog

if TYPE_CHECKING:
    from policies_wasm.opa_wasm import OpaWasmEngine

BUDGET_ENV = "CP_POLICY_BUDGET_MS"
WORKERS_ENV = "CP_POLICY_WORKERS"
QUARANTINE_ENV = "CP_POLICY_QUARANTINE_SECONDS"
DEFAULT_BUDGET_MS = 100.0
DEFAULT_WORKERS = 2
DEFAULT_QUARANTINE_SECONDS = 5.0
WASM_THREADS = 4
MAX_WASM_ENGINES = 32
DECISION_MEMORY = 4096
IMPURE_BUILTINS = re.compile(
    r"\b(?:time\.now_ns|rand\.intn|http\.send|uuid\.rfc4122|opa\.runtime|net\.lookup_ip_addr"
    r"|crypto\.x509\.parse_and_verify_certificates|io\.jwt\.decode_verify)\b"
)


def answers_from_input_alone(bundle: Bundle) -> bool:
    """Whether the same input always gets the same decision from ``bundle``: its sources call no builtin
    that reads the clock, draws a random number or reaches the network. A bundle shipped without its
    sources (wasm only) cannot be read, so it is not trusted to be pure."""
    return bool(bundle.modules) and not any(IMPURE_BUILTINS.search(source) for source in bundle.modules.values())


@dataclass(frozen=True)
class Budget:
    ms: float = DEFAULT_BUDGET_MS
    """Wall-clock time one evaluation may take."""
    workers: int = DEFAULT_WORKERS
    """Processes evaluating Rego in parallel."""
    quarantine_seconds: float = DEFAULT_QUARANTINE_SECONDS
    """How long an owner's bundle is refused after it overran."""

    @classmethod
    def from_env(cls) -> Budget:
        env = os.environ
        budget = cls(
            ms=float(env.get(BUDGET_ENV, DEFAULT_BUDGET_MS)),
            workers=int(env.get(WORKERS_ENV, DEFAULT_WORKERS)),
            quarantine_seconds=float(env.get(QUARANTINE_ENV, DEFAULT_QUARANTINE_SECONDS)),
        )
        if budget.ms <= 0 or budget.workers < 1 or budget.quarantine_seconds < 0:
            raise ValueError(
                f"{BUDGET_ENV} must be > 0, {WORKERS_ENV} ≥ 1 and {QUARANTINE_ENV} ≥ 0; got {budget.ms}, "
                f"{budget.workers}, {budget.quarantine_seconds}"
            )
        return budget

    def describe(self) -> str:
        return f"{self.ms:g} ms ({BUDGET_ENV})"


class PolicyEvaluator:
    """Decides off the event loop, on the budget; safe to share between tasks of one loop."""

    def __init__(self, budget: Budget | None = None) -> None:
        self.budget = budget or Budget.from_env()
        self._processes = RegoProcesses(self.budget.workers)
        self._threads = ThreadPoolExecutor(WASM_THREADS, thread_name_prefix="policy-wasm")
        self._watchdog = Watchdog()
        self._wasm_engines: OrderedDict[str, OpaWasmEngine] = OrderedDict()
        self._wasm_lock = threading.Lock()
        self._quarantine: dict[tuple[str, str], float] = {}
        self._owners = _PerOwner(max(1, self.budget.workers - 1))
        self._decisions: OrderedDict[tuple[str, str, bytes], Decision] = OrderedDict()
        self._asked: dict[tuple[str, str, bytes], asyncio.Event] = {}  # questions being evaluated now
        self._pure: dict[str, bool] = {}  # bundle digest -> answers_from_input_alone
        self.remembered = 0
        """Decisions answered from memory since the start: what the memory saved the workers."""

    async def prepare(self, bundle: Bundle) -> str:
        """Compile `bundle` where it will be evaluated (in every worker process, started if need be):
        the engine's name, or PolicyLoadError."""
        if bundle.wasm is not None:
            return (await asyncio.wrap_future(self._threads.submit(self._wasm_engine, bundle))).name
        names = await asyncio.gather(*map(asyncio.wrap_future, self._processes.load(bundle)))
        return names[0]

    async def evaluate(self, bundle: Bundle, entrypoint: str, input: Any, *, owner: str | None = None) -> Decision:
        """The decision, within the budget. Raises a PolicyError: PolicyTimeout when the budget ran out
        (or `owner`'s evaluations of this bundle are quarantined after an overrun)."""
        key = None if owner is None else (owner, bundle.digest)

        def admit() -> None:
            self._admit(key, entrypoint)

        admit()  # refused at once, without queueing
        raw_input = canonical_json(input)  # a PolicyInputError is raised here, not in a worker
        question = (bundle.digest, entrypoint, raw_input) if self._is_pure(bundle) else None
        if question is None:
            return await self._evaluate(bundle, entrypoint, input, raw_input, key, admit)
        # The same question asked while it is being evaluated waits for that answer (a burst asks it
        # many times at once); if that evaluation fails, the next waiter evaluates it again.
        while (known := self._decisions.get(question)) is None and (asked := self._asked.get(question)):
            await asked.wait()
        if known is not None:
            self._decisions.move_to_end(question)
            self.remembered += 1
            return msgspec.structs.replace(known, duration_ms=0.0)
        self._asked[question] = asyncio.Event()
        try:
            decision = await self._evaluate(bundle, entrypoint, input, raw_input, key, admit)
        finally:
            self._asked.pop(question).set()
        self._decisions[question] = decision
        if len(self._decisions) > DECISION_MEMORY:
            self._decisions.popitem(last=False)
        return decision

    async def _evaluate(
        self,
        bundle: Bundle,
        entrypoint: str,
        input: Any,
        raw_input: bytes,
        key: tuple[str, str] | None,
        admit: Callable[[], None],
    ) -> Decision:
        owner = None if key is None else key[0]
        timeout = self.budget.ms / 1000
        async with self._owners.turn(owner):
            admit()  # the owner's request before this one may have overrun
            if bundle.wasm is not None:
                future = self._threads.submit(self._evaluate_wasm, bundle, entrypoint, input, timeout, admit)
            else:
                future = self._processes.evaluate(bundle, entrypoint, raw_input, timeout, admit=admit)
            try:
                return await asyncio.wrap_future(future)
            except PolicyTimeout:
                if key is not None and not self._quarantined(key):
                    self._quarantine_now(key)
                raise

    def _is_pure(self, bundle: Bundle) -> bool:
        pure = self._pure.get(bundle.digest)
        if pure is None:
            if len(self._pure) >= DECISION_MEMORY:
                self._pure.clear()
            pure = self._pure[bundle.digest] = answers_from_input_alone(bundle)
        return pure

    def close(self) -> None:
        self._processes.close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # --- Quarantine ---------------------------------------------------------------------------------

    def _quarantined(self, key: tuple[str, str]) -> bool:
        return self._quarantine.get(key, 0.0) > time.monotonic()

    def _quarantine_now(self, key: tuple[str, str]) -> None:
        now = time.monotonic()
        for stale in [known for known, until in self._quarantine.items() if until <= now]:
            self._quarantine.pop(stale, None)
        self._quarantine[key] = now + self.budget.quarantine_seconds

    def _admit(self, key: tuple[str, str] | None, entrypoint: str) -> None:
        """Runs on the loop and again when a worker takes the job (requests queued before an overrun)."""
        if key is None:
            return
        until = self._quarantine.get(key, 0.0)
        left = until - time.monotonic()
        if left > 0:
            raise PolicyTimeout(
                f"{entrypoint} was not evaluated: {key[0]}'s evaluations of this bundle are refused for "
                f"{self.budget.quarantine_seconds:g} s after one overran the budget of {self.budget.describe()} "
                f"({left:.1f} s left)"
            )

    # --- wasm on threads ----------------------------------------------------------------------------

    def _wasm_engine(self, bundle: Bundle) -> OpaWasmEngine:
        with self._wasm_lock:
            engine = self._wasm_engines.get(bundle.digest)
            if engine is not None:
                self._wasm_engines.move_to_end(bundle.digest)
                return engine
        from policies_wasm.opa_wasm import OpaWasmEngine  # wasmtime only when a bundle is compiled

        engine = OpaWasmEngine(watchdog=self._watchdog)
        engine.load(bundle)  # compiles: outside the lock
        with self._wasm_lock:
            engine = self._wasm_engines.setdefault(bundle.digest, engine)
            while len(self._wasm_engines) > MAX_WASM_ENGINES:
                self._wasm_engines.popitem(last=False)
        return engine

    def _evaluate_wasm(
        self, bundle: Bundle, entrypoint: str, input: Any, timeout: float, admit: Callable[[], None]
    ) -> Decision:
        admit()
        return self._wasm_engine(bundle).evaluate(entrypoint, input, timeout=timeout)


class _PerOwner:
    """At most `limit` turns at once per owner; requests without an owner are not limited."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._turns: dict[str, tuple[asyncio.Semaphore, int]] = {}  # owner -> (semaphore, holders + waiters)

    @contextlib.asynccontextmanager
    async def turn(self, owner: str | None) -> AsyncIterator[None]:
        if owner is None:
            yield
            return
        semaphore, users = self._turns.get(owner) or (asyncio.Semaphore(self._limit), 0)
        self._turns[owner] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._turns[owner]
            if users == 1:
                del self._turns[owner]
            else:
                self._turns[owner] = (semaphore, users - 1)
