"""The budgeted evaluator: every decision leaves the event loop and is stopped for real at its time
budget — Rego by killing the worker process that runs it, wasm by epoch interruption — while other
owners' decisions keep their latency; an owner whose bundle overran is refused for a while without
evaluating; a decision is the same as the engine's own."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from policies_wasm.budget import Budget, PolicyEvaluator
from policies_wasm.engine import (
    SOURCES_DIR,
    Bundle,
    PolicyEvaluationError,
    PolicyInputError,
    PolicyLoadError,
    PolicyTimeout,
    PolicyUndefined,
    UnknownEntrypoint,
)
from policies_wasm.opa_wasm import OpaWasmEngine
from policies_wasm.rego import RegoEngine
from runners.policies import Policies
from tests.policies.wat_modules import wasm_bundle

SHIPPED = Bundle.from_dir(SOURCES_DIR)
SUBMIT = {"org": "acme", "queue": "default", "task_type": "report", "usage": {"org_in_flight": 1}}
ENTRYPOINT = "# METADATA\n# entrypoint: true\n"
# 10^10 iterations: far beyond any budget (rego-cpp's own statement limit, which its C API does not let
# us set, would end it with an error after several seconds).
RUNAWAY = Bundle(
    modules={
        "runaway.rego": f"package t\n\n{ENTRYPOINT}spin := count([x | some x in numbers.range(1, 100000); "
        "some y in numbers.range(1, 100000); x == y])\n\n"
        f"{ENTRYPOINT}fine := input.n + 1\n"
    }
)


@pytest.fixture
async def evaluator() -> AsyncIterator[PolicyEvaluator]:
    evaluator = PolicyEvaluator(Budget(ms=100, workers=2, quarantine_seconds=0.5))
    await evaluator.prepare(SHIPPED)
    try:
        yield evaluator
    finally:
        evaluator.close()


def workers() -> dict[int, float]:
    """This process's policy worker processes (Linux /proc): PID -> CPU seconds used so far."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"policies_wasm.worker" in cmdline and int(fields[1]) == os.getpid():
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


async def test_a_decision_is_the_engines_own(evaluator: PolicyEvaluator) -> None:
    direct = RegoEngine()
    direct.load(SHIPPED)
    for entrypoint, input in [
        ("controlplane/submit", SUBMIT),
        ("controlplane/submit", {"org": "acme", "tools": [1]}),
        ("controlplane/tool", {"org": "acme", "tool": "shell"}),
        ("controlplane/settings", {"org": "acme"}),
    ]:
        budgeted = await evaluator.evaluate(SHIPPED, entrypoint, input, owner="acme")
        expected = direct.evaluate(entrypoint, input)
        assert (budgeted.value, budgeted.engine, budgeted.bundle_digest, budgeted.input_digest) == (
            expected.value,
            expected.engine,
            expected.bundle_digest,
            expected.input_digest,
        )


async def test_errors_keep_their_kind_across_the_process_boundary(evaluator: PolicyEvaluator) -> None:
    with pytest.raises(UnknownEntrypoint, match="controlplane/nope"):
        await evaluator.evaluate(SHIPPED, "controlplane/nope", {})
    with pytest.raises(PolicyInputError):
        await evaluator.evaluate(SHIPPED, "controlplane/submit", {"tools": {"a set", "of tools"}})
    undefined = Bundle(modules={"u.rego": f"package u\n\n{ENTRYPOINT}x := 1 if input.never\n"})
    with pytest.raises(PolicyUndefined):
        await evaluator.evaluate(undefined, "u/x", {})
    with pytest.raises(PolicyLoadError, match="does not compile"):
        await evaluator.prepare(Bundle(modules={"b.rego": f"package b\n{ENTRYPOINT}x := {{{{{{\n"}))


async def test_a_runaway_rego_evaluation_is_stopped_at_its_budget_and_burns_no_core_after(
    evaluator: PolicyEvaluator,
) -> None:
    started = time.monotonic()
    with pytest.raises(PolicyTimeout, match=r"did not finish within its budget of 100 ms .*was killed"):
        await evaluator.evaluate(RUNAWAY, "t/spin", {})
    assert time.monotonic() - started < 2.0, "stopped at the budget, not when the loop ends"
    assert (await evaluator.evaluate(RUNAWAY, "t/fine", {"n": 1})).value == 2, "the pool serves on"
    if not sys.platform.startswith("linux"):
        return
    await asyncio.sleep(1.0)  # the replacement worker has started
    before = sum(workers().values())
    await asyncio.sleep(0.5)
    assert sum(workers().values()) - before < 0.1, "no worker is still running the loop"


async def test_other_owners_keep_deciding_while_one_overruns(evaluator: PolicyEvaluator) -> None:
    await evaluator.evaluate(RUNAWAY, "t/fine", {"n": 1})  # both bundles compiled in a worker
    latencies: list[float] = []
    done = asyncio.Event()

    async def meanwhile() -> None:
        until = time.monotonic() + 1.0  # the overrun, and the replacement of the worker it killed
        while not done.is_set() or time.monotonic() < until:
            started = time.monotonic()
            await evaluator.evaluate(SHIPPED, "controlplane/submit", SUBMIT, owner="acme")
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.002)

    async def runaways() -> None:
        try:
            results = await asyncio.gather(
                *(evaluator.evaluate(RUNAWAY, "t/spin", {}, owner="evil") for _ in range(4)), return_exceptions=True
            )
        finally:
            done.set()
        assert all(isinstance(result, PolicyTimeout) for result in results), results

    await asyncio.gather(meanwhile(), runaways())
    assert len(latencies) > 10
    assert max(latencies) < 0.1, f"acme waited {max(latencies) * 1000:.0f} ms while evil's policy ran away"


async def test_after_an_overrun_the_owner_is_refused_without_evaluating_for_the_quarantine(
    evaluator: PolicyEvaluator,
) -> None:
    with pytest.raises(PolicyTimeout, match="did not finish"):
        await evaluator.evaluate(RUNAWAY, "t/spin", {}, owner="evil")
    started = time.monotonic()
    with pytest.raises(
        PolicyTimeout, match=r"was not evaluated: evil.s evaluations of this bundle are refused for 0\.5 s"
    ):
        await evaluator.evaluate(RUNAWAY, "t/fine", {"n": 1}, owner="evil")
    assert time.monotonic() - started < 0.05
    assert (await evaluator.evaluate(RUNAWAY, "t/fine", {"n": 1}, owner="other")).value == 2, "owners apart"
    await asyncio.sleep(0.6)
    assert (await evaluator.evaluate(RUNAWAY, "t/fine", {"n": 1}, owner="evil")).value == 2, "quarantine over"


async def test_a_worker_that_died_is_replaced_transparently() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("finds the worker processes in /proc")
    others = set(workers())  # pools of other fixtures of this process (a suite's gateway stacks) stay out
    evaluator = PolicyEvaluator(Budget(ms=100, workers=2, quarantine_seconds=0.5))
    try:
        await evaluator.prepare(SHIPPED)
        await evaluator.evaluate(SHIPPED, "controlplane/submit", SUBMIT)
        await asyncio.sleep(0.5)  # both workers started
        ours = set(workers()) - others
        assert len(ours) == 2
        for pid in ours:
            os.kill(pid, signal.SIGKILL)  # our own children, by PID
        await asyncio.sleep(0.1)
        for _ in range(4):
            assert (await evaluator.evaluate(SHIPPED, "controlplane/submit", SUBMIT)).value["allow"] is True
    finally:
        evaluator.close()


def test_a_runaway_wasm_evaluation_is_interrupted_at_its_deadline_not_its_fuel() -> None:
    engine = OpaWasmEngine(fuel=2**62)  # fuel that would last for hours
    engine.load(wasm_bundle("faults"))
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(PolicyTimeout, match="did not finish within its budget of 100 ms"):
            engine.evaluate("test/loop", {}, timeout=0.1)
        assert time.monotonic() - started < 1.0
        assert engine.evaluate("test/println", [1], timeout=0.1).value == [1], "the next evaluation is not hit"


async def test_wasm_runs_on_threads_within_the_budget(evaluator: PolicyEvaluator) -> None:
    faults = wasm_bundle("faults")
    assert await evaluator.prepare(faults) == "opa-wasm"
    started = time.monotonic()
    with pytest.raises(PolicyTimeout):
        await evaluator.evaluate(faults, "test/loop", {}, owner="evil")
    assert time.monotonic() - started < 1.0
    assert (await evaluator.evaluate(faults, "test/println", {"a": 1})).value == {"a": 1}
    with pytest.raises(PolicyEvaluationError, match="aborted"):
        await evaluator.evaluate(faults, "test/abort", {})


def test_the_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CP_POLICY_BUDGET_MS", "CP_POLICY_WORKERS", "CP_POLICY_QUARANTINE_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    assert Budget.from_env() == Budget()
    monkeypatch.setenv("CP_POLICY_BUDGET_MS", "250")
    monkeypatch.setenv("CP_POLICY_WORKERS", "3")
    assert Budget.from_env() == Budget(ms=250, workers=3)
    monkeypatch.setenv("CP_POLICY_BUDGET_MS", "0")
    with pytest.raises(ValueError, match="CP_POLICY_BUDGET_MS must be > 0"):
        Budget.from_env()


async def test_a_runner_decides_on_the_same_budget(evaluator: PolicyEvaluator) -> None:
    policies = Policies(RUNAWAY, evaluator=evaluator)  # as if the runner's shipped policies ran away
    started = time.monotonic()
    with pytest.raises(PolicyTimeout, match="did not finish within its budget of 100 ms"):
        await policies.evaluate("t/spin", {}, org="acme", pinned=None, api=None)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0
    with pytest.raises(PolicyTimeout, match="was not evaluated"):
        await policies.evaluate("t/fine", {"n": 1}, org="acme", pinned=None, api=None)  # type: ignore[arg-type]


async def test_a_worker_starved_of_cpu_is_waited_for_rather_than_killed_at_the_budget() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("CPU time comes from /proc")
    others = set(workers())  # pools of other fixtures of this process stay out
    evaluator = PolicyEvaluator(Budget(ms=100, workers=2, quarantine_seconds=0.5))
    try:
        await evaluator.evaluate(RUNAWAY, "t/fine", {"n": 1})
        await asyncio.sleep(0.5)  # both workers started, the bundle compiled in both
        paused = sorted(set(workers()) - others)
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)  # as an overloaded machine would: no CPU for them for a while
        try:
            # another input than the first: that one's decision is remembered and needs no worker
            deciding = asyncio.ensure_future(evaluator.evaluate(RUNAWAY, "t/fine", {"n": 2}))
            await asyncio.sleep(0.3)
            assert not deciding.done()
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        assert (await deciding).value == 3, "three budgets late, but it used no CPU: not a runaway"
        assert sorted(set(workers()) - others) == paused, "no worker was killed"
    finally:
        evaluator.close()
