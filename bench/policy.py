"""Policy benchmark: decisions/s and latency percentiles for each engine, one decision at a time.

- regopy on the shipped Rego sources, with an org that configures every inheritance level (the
  costliest case) and one that configures none;
- opa-wasm on the shipped policies when `policies_wasm/build/bundle.tar.gz` was built from the
  current sources (policies_wasm/build.sh, needs the opa CLI). Without it, the host alone is
  measured on the WAT echo module from tests/policies (ABI 1.2 and 1.1): that is everything except
  the compiled policy's own work;
- the same workloads through `PolicyEvaluator`, as the gateway and runners decide: off the event loop
  and on the time budget (Rego in a worker process, wasm on a thread with epoch interruption), one
  `await` at a time. The difference to the rows above is the cost of leaving the loop.

    .venv/bin/python bench/policy.py [--decisions 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from policies_wasm.budget import Budget, PolicyEvaluator
from policies_wasm.engine import SOURCES_DIR, Bundle, PolicyEngine, default_bundle
from policies_wasm.opa_wasm import OpaWasmEngine
from policies_wasm.rego import RegoEngine

# An org that sets something at every level, so a decision walks the whole inheritance chain.
CONFIGURED_ORG = {
    "settings": {"max_tasks_in_flight_per_org": 50, "max_tokens_per_day": 2_000_000, "approval_tools": ["shell"]},
    "environments": {"prod": {"approval_cost_usd": 1, "denied_tools": ["shell"], "max_cost_usd": 100}},
    "queues": {"deploys": {"max_tasks_in_flight_per_queue": 10}},
    "workflows": {"agent-deploy": {"allowed_models": ["gpt-4o*"], "approval_task_types": ["deploy"]}},
}
SCOPE = {"org": "acme", "environment": "prod", "queue": "deploys", "workflow": "agent-deploy"}
WORKLOAD: list[tuple[str, str, dict[str, Any]]] = [
    (
        "submit, every level configured",
        "controlplane/submit",
        {
            **SCOPE,
            "task_type": "deploy",
            "estimated_cost_usd": 0.4,
            "tools": ["github.create_pr"],
            "models": ["gpt-4o-mini"],
            "payload_bytes": 2048,
            "usage": {"org_in_flight": 12, "queue_in_flight": 3, "tokens_today": 150_000},
        },
    ),
    (
        "submit, org without settings",
        "controlplane/submit",
        {"org": "globex", "queue": "default", "task_type": "report"},
    ),
    (
        "tool call, every level configured",
        "controlplane/tool",
        {**SCOPE, "tool": "github.create_pr", "tokens_requested": 800, "usage": {"tokens_today": 150_000}},
    ),
    ("effective settings", "controlplane/settings", SCOPE),
]


def with_configured_org(bundle: Bundle) -> Bundle:
    data = copy.deepcopy(bundle.data)
    data["policy_config"]["orgs"] = {"acme": CONFIGURED_ORG}
    return bundle.with_data(data)


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(evaluate: Callable[[], object], decisions: int) -> tuple[float, float, float]:
    """(decisions/s, p50 ms, p99 ms), after a warm-up."""
    for _ in range(min(200, decisions)):
        evaluate()
    latencies = []
    started = time.perf_counter()
    for _ in range(decisions):
        begin = time.perf_counter()
        evaluate()
        latencies.append((time.perf_counter() - begin) * 1000)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return decisions / elapsed, percentile(latencies, 0.50), percentile(latencies, 0.99)


async def measure_async(evaluate: Callable[[], Awaitable[object]], decisions: int) -> tuple[float, float, float]:
    """As `measure`, for a decision awaited on the event loop."""
    for _ in range(min(200, decisions)):
        await evaluate()
    latencies = []
    started = time.perf_counter()
    for _ in range(decisions):
        begin = time.perf_counter()
        await evaluate()
        latencies.append((time.perf_counter() - begin) * 1000)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return decisions / elapsed, percentile(latencies, 0.50), percentile(latencies, 0.99)


async def budgeted_rows(
    rego_bundle: Bundle, wasm_rows: list[tuple[str, Bundle, str, Any]], decisions: int
) -> list[tuple[str, str, tuple[float, float, float]]]:
    """The workloads through the evaluator the gateway and runners use."""
    evaluator = PolicyEvaluator(Budget())
    rows: list[tuple[str, str, tuple[float, float, float]]] = []
    try:
        engine = await evaluator.prepare(rego_bundle)
        for label, entrypoint, request in WORKLOAD:

            def decide(e: str = entrypoint, r: Any = request) -> Awaitable[object]:
                return evaluator.evaluate(rego_bundle, e, r, owner="acme")

            rows.append((engine, f"budgeted: {label}", await measure_async(decide, decisions)))
        for label, bundle, entrypoint, request in wasm_rows:
            engine = await evaluator.prepare(bundle)

            def decide_wasm(b: Bundle = bundle, e: str = entrypoint, r: Any = request) -> Awaitable[object]:
                return evaluator.evaluate(b, e, r, owner="acme")

            rows.append((engine, f"budgeted: {label}", await measure_async(decide_wasm, decisions)))
    finally:
        evaluator.close()
    return rows


def loaded(engine: PolicyEngine, bundle: Bundle) -> PolicyEngine:
    engine.load(bundle)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=3000, help="timed decisions per row")
    decisions = parser.parse_args().decisions

    rows: list[tuple[str, str, tuple[float, float, float]]] = []
    sources = with_configured_org(Bundle.from_dir(SOURCES_DIR))
    regopy = loaded(RegoEngine(), sources)
    for label, entrypoint, request in WORKLOAD:
        rows.append((regopy.name, label, measure(lambda e=entrypoint, r=request: regopy.evaluate(e, r), decisions)))

    compiled = default_bundle()
    wasm_rows: list[tuple[str, Bundle, str, Any]] = []
    if compiled.wasm is not None:
        wasm = loaded(OpaWasmEngine(), with_configured_org(compiled))
        for label, entrypoint, request in WORKLOAD:
            rows.append((wasm.name, label, measure(lambda e=entrypoint, r=request: wasm.evaluate(e, r), decisions)))
            wasm_rows.append((label, with_configured_org(compiled), entrypoint, request))
    else:
        # The WAT modules live with the tests (not an installed package): borrow them by path.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.policies.wat_modules import wasm_bundle

        request = WORKLOAD[0][2]
        for abi_minor, path in ((2, "opa_eval"), (1, "eval + opa_eval_ctx_*")):
            echo_bundle = wasm_bundle("echo", abi_minor=abi_minor)
            echo = loaded(OpaWasmEngine(), echo_bundle)
            label = f"host only: WAT echo, ABI 1.{abi_minor} ({path})"
            rows.append(
                (echo.name, label, measure(lambda engine=echo: engine.evaluate("test/echo", request), decisions))
            )
            if abi_minor == 2:
                wasm_rows.append((label, echo_bundle, "test/echo", request))
        sprintf = loaded(OpaWasmEngine(), wasm_bundle("builtins", builtins={"sprintf": 7}))
        label = "host only: WAT, one sprintf on the host"
        rows.append((sprintf.name, label, measure(lambda: sprintf.evaluate("test/sprintf", ["ada", 3]), decisions)))

    rows.extend(asyncio.run(budgeted_rows(sources, wasm_rows, decisions)))

    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"{python} on {platform.machine()}, {decisions} decisions per row, one at a time")
    if compiled.wasm is None:
        print("no compiled policies_wasm/build/bundle.tar.gz: opa-wasm rows time the host on WAT modules")
    print(f"budgeted rows: PolicyEvaluator, budget {Budget().ms:g} ms, awaited one at a time on an event loop")
    print(f"{'engine':<9} {'workload':<62} {'decisions/s':>12} {'p50 ms':>8} {'p99 ms':>8}")
    for engine_name, label, (rate, p50, p99) in rows:
        print(f"{engine_name:<9} {label:<62} {rate:>12,.0f} {p50:>8.3f} {p99:>8.3f}")


if __name__ == "__main__":
    main()
