"""The metrics operators alert on (gateway/metrics.py, ADR 0009), read from ``GET /metrics`` of a real
stack while a scripted run moves them: queue depth, approvals and their wait, durations and outcomes,
retries and lease expiries, parked tasks, policy decisions, LLM usage and timer lateness; label values
stay bounded however many orgs and queues there are; the dashboard in docs/ only uses metrics that
exist.

The scripted runs get stacks of their own (a fresh log and read model, a short cache, a chosen label
budget), so no other test's tasks move what they measure."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from controlplane.seed import seed_org
from core.domain.ids import new_id
from gateway.metrics import OTHER, EventMetrics, LabelBudget
from gateway.queue_gauges import QueueGauges
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from tests.gateway.conftest import ROLES, Stack, own_stack
from tests.gateway.test_api import claim, problem, submit
from tests.gateway.test_runner import running, until

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
APPROVAL_DELAY = 1.0
Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def queue() -> str:
    return f"m{new_id()[-10:]}"


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 for a series not exposed (a counter no event has moved yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(name: str, **labels: str) -> tuple[str, Labels]:
    return name, frozenset(labels.items())


async def settle(client: httpx.AsyncClient, want: Samples, within: float = 20) -> Samples:
    """Scrape until every series in ``want`` has its value (the projector and the claim index follow
    the log asynchronously); then, or at the deadline, assert all of them at once."""
    deadline = time.monotonic() + within
    while True:
        samples = await scrape(client)
        got = {key: samples.get(key, 0.0) for key in want}
        if got == want or time.monotonic() > deadline:
            assert got == want
            return samples
        await asyncio.sleep(0.1)


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@workflow("metrics-chat", version=1)
async def metrics_chat(ctx: WorkflowContext, payload: Any) -> str:
    reply = await ctx.llm(
        "greet", model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], mock_response="hello there"
    )
    return str(reply["content"])


async def test_the_metrics_move_as_a_scripted_run_says_they_must(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CP_METRICS_CACHE_SECONDS", "0.2")  # each step's gauges show within a few polls
    async with (
        own_stack(tmp_path, database_url) as stack,
        stack.client() as admin,
        stack.client(role="worker") as worker,
        stack.client(role="approver") as approver,
        httpx.AsyncClient(base_url=stack.url) as scraper,
    ):
        q = queue()
        pair = {"org": "acme", "queue": q}

        def depth(pending: int, running: int, awaiting: int) -> Samples:
            return {
                series("cp_queue_tasks", **pair, status="pending"): pending,
                series("cp_queue_tasks", **pair, status="running"): running,
                series("cp_queue_tasks", **pair, status="awaiting_approval"): awaiting,
            }

        before = await scrape(scraper)
        first_submit = time.monotonic()
        ids = [(await submit(admin, q))["id"] for _ in range(3)]
        samples = await settle(scraper, {**depth(3, 0, 0), series("cp_tasks_submitted_total", **pair): 3})
        assert 0 < value(samples, "cp_queue_oldest_pending_seconds", **pair) <= time.monotonic() - first_submit + 1

        leased = await claim(worker, q, lease_seconds=600)
        assert leased is not None and leased["task"]["id"] == ids[0]
        await settle(scraper, depth(2, 1, 0))

        lease = {"worker_id": "w1", "lease_id": leased["lease"]["id"]}
        asked = await worker.post(f"/v1/tasks/{ids[0]}/approval-requests", json={**lease, "reason": "ship it?"})
        assert asked.status_code == 201, asked.text
        asked_at = time.monotonic()
        samples = await settle(
            scraper,
            {
                **depth(2, 0, 1),
                series("cp_approvals_pending", **pair): 1,
                series("cp_approvals_requested_total", **pair): 1,
            },
        )
        assert value(samples, "cp_approvals_oldest_pending_seconds", **pair) > 0
        await asyncio.sleep(max(0.0, APPROVAL_DELAY - (time.monotonic() - asked_at)))
        waited = time.monotonic() - asked_at
        decided = await approver.post(f"/v1/approvals/{asked.json()['id']}/approve")
        assert decided.status_code == 200, decided.text
        wait = {**pair, "outcome": "approved"}
        samples = await settle(
            scraper,
            {
                **depth(3, 0, 0),
                series("cp_approvals_pending", **pair): 0,
                series("cp_approval_wait_seconds_count", **wait): 1,
            },
        )
        assert waited <= value(samples, "cp_approval_wait_seconds_sum", **wait) < waited + 5

        again = await claim(worker, q, lease_seconds=600)
        assert again is not None and again["task"]["id"] == ids[0]
        done = await worker.post(
            f"/v1/tasks/{ids[0]}/complete", json={"worker_id": "w1", "lease_id": again["lease"]["id"]}
        )
        assert done.status_code == 200, done.text
        samples = await settle(
            scraper,
            {
                **depth(2, 0, 0),
                series("cp_tasks_finished_total", **pair, outcome="completed"): 1,
                series("cp_task_duration_seconds_count", **pair): 1,
            },
        )
        took = moment(done.json()["completed_at"]) - moment(done.json()["created_at"])
        assert value(samples, "cp_task_duration_seconds_sum", **pair) == pytest.approx(took.total_seconds(), abs=1e-3)

        lateness = {"timer": "TaskLeaseExpired"}
        lapsed = await claim(worker, q, lease_seconds=1)  # and never renewed
        assert lapsed is not None
        samples = await settle(
            scraper,
            {
                **depth(2, 0, 0),
                series("cp_task_lease_expiries_total", **pair): 1,
                series("cp_task_retries_total", **pair, reason="lease_expired"): 1,
                series("cp_timer_lateness_seconds_count", **lateness): value(
                    before, "cp_timer_lateness_seconds_count", **lateness
                )
                + 1,
            },
        )
        assert value(samples, "cp_timer_lateness_seconds_sum", **lateness) >= 0

        stuck = await claim(worker, q, lease_seconds=600)
        assert stuck is not None
        parked = await worker.post(
            f"/v1/tasks/{stuck['task']['id']}/non-determinism",
            json={"worker_id": "w1", "lease_id": stuck["lease"]["id"], "index": 0},
        )
        assert parked.status_code == 200, parked.text
        await settle(scraper, {**depth(2, 0, 0), series("cp_queue_tasks_parked", **pair): 1})

        submit_policy = {"org": "acme", "entrypoint": "controlplane/submit"}
        risky = {"type": "deploy", "queue": q, "metadata": {"tools": "rm -rf /"}}  # tools must be a list
        problem(await admin.post("/v1/tasks", json=risky), 403)
        await settle(
            scraper,
            {
                series("cp_policy_decisions_total", **pair, entrypoint="controlplane/submit", decision="deny"): 1,
                series("cp_policy_decisions_total", **pair, entrypoint="controlplane/submit", decision="allow"): 3,
                series("cp_policy_decision_seconds_count", **submit_policy): value(
                    before, "cp_policy_decision_seconds_count", **submit_policy
                )
                + 4,
                series("cp_tasks_submitted_total", **pair): 3,  # the denied one was never created
            },
        )

        chat_queue = queue()
        chat = {"org": "acme", "queue": chat_queue, "model": "gpt-4o-mini"}
        async with running(stack, Registry([metrics_chat]), chat_queue):
            spec = {"type": "chat", "queue": chat_queue, "workflow": {"name": "metrics-chat", "version": 1}}
            submitted = await admin.post("/v1/tasks", json=spec)
            assert submitted.status_code == 201, submitted.text
            task_url = f"/v1/tasks/{submitted.json()['id']}"

            async def completed() -> bool:
                return (await admin.get(task_url)).json()["status"] == "completed"

            await until(completed)
        journal = (await admin.get(task_url)).json()["journal"]
        [call] = [entry["result"] for entry in journal if entry["kind"] == "llm"]
        tool_checks = [e for e in journal if e["kind"] == "policy" and e["name"] == "controlplane/tool"]
        assert call["usage"]["prompt_tokens"] > 0 and call["usage"]["completion_tokens"] > 0
        assert call["cost_usd"] > 0, "LiteLLM prices gpt-4o-mini from its local map: the cost check below bites"
        samples = await settle(
            scraper,
            {
                series("cp_llm_calls_total", **chat): 1,
                series("cp_llm_tokens_total", **chat, kind="prompt"): call["usage"]["prompt_tokens"],
                series("cp_llm_tokens_total", **chat, kind="completion"): call["usage"]["completion_tokens"],
                series(
                    "cp_policy_decisions_total",
                    org="acme",
                    queue=chat_queue,
                    entrypoint="controlplane/tool",
                    decision="allow",
                ): len(tool_checks),
                series("cp_tasks_finished_total", org="acme", queue=chat_queue, outcome="completed"): 1,
            },
        )
        assert value(samples, "cp_llm_cost_usd_total", **chat) == pytest.approx(call["cost_usd"])


async def test_label_values_stay_bounded_with_many_orgs_and_queues(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = {"orgs": 3, "queues": 2, "pairs": 4}
    monkeypatch.setenv("CP_METRICS_MAX_ORGS", str(budget["orgs"]))
    monkeypatch.setenv("CP_METRICS_MAX_QUEUES_PER_ORG", str(budget["queues"]))
    monkeypatch.setenv("CP_METRICS_MAX_PAIRS", str(budget["pairs"]))
    monkeypatch.setenv("CP_METRICS_CACHE_SECONDS", "0.2")
    async with own_stack(tmp_path, database_url) as stack, httpx.AsyncClient(base_url=stack.url) as scraper:
        orgs = ["acme", "globex"]
        for n in range(4):
            orgs.append(f"tenant{n}")
            stack.keys[orgs[-1]] = await seed_org(stack.services.handler, orgs[-1], ROLES)
        await stack.projector.run_until_caught_up()
        task_ids: set[str] = set()
        for org in orgs:
            async with stack.client(org) as admin:
                for _ in range(3):
                    task_ids.add((await submit(admin, queue()))["id"])
        everything = len(task_ids)

        async def all_counted() -> bool:
            samples = await scrape(scraper)
            return (
                sum(v for (n, _), v in samples.items() if n == "cp_tasks_submitted_total") == everything
                and sum(
                    v for (n, labels), v in samples.items() if n == "cp_queue_tasks" and ("status", "pending") in labels
                )
                == everything
            )

        await until(all_counted, within=20)  # nothing is lost past the budget: it is counted as _other
        samples = await scrape(scraper)
        operator_series = [
            dict(labels) for (name, labels) in samples if name.startswith("cp_") and "org" in dict(labels)
        ]
        assert operator_series
        org_values = {labels["org"] for labels in operator_series}
        assert OTHER in org_values and len(org_values) <= budget["orgs"] + 1
        pairs = {(labels["org"], labels["queue"]) for labels in operator_series if "queue" in labels}
        assert len(pairs) <= budget["pairs"] + budget["orgs"] + 1
        for org in org_values:
            assert len({q for o, q in pairs if o == org}) <= budget["queues"] + 1, org
        label_values = {v for labels in operator_series for v in labels.values()}
        assert not label_values & task_ids, "no task id is ever a label value"


async def test_scrapes_share_one_read_of_the_read_model(stack: Stack) -> None:
    ok = {"result": "ok"}
    async with httpx.AsyncClient(base_url=stack.url) as scraper:
        first = value(await scrape(scraper), "cp_metrics_read_model_queries_total", **ok)
        await asyncio.gather(*(scrape(scraper) for _ in range(10)))
        last = value(await scrape(scraper), "cp_metrics_read_model_queries_total", **ok)
    assert first >= 1
    assert last - first <= 1, "within the cache time, twelve scrapes read the read model at most once more"


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                yield item
            else:
                yield from dashboard_exprs(item)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


SAMPLE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


async def test_the_dashboard_uses_only_metrics_the_gateway_exposes_and_shows_each_operator_metric(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(dashboard_exprs(dashboard))
    assert dashboard["panels"] and exprs
    used = {name for expr in exprs for name in re.findall(r"\bcp_[a-z0-9_]+", expr)}
    async with httpx.AsyncClient(base_url=stack.url) as scraper:
        r = await scraper.get("/metrics")
    families = {family.name: family.type for family in text_string_to_metric_families(r.text)}
    exposed = {name + suffix for name, kind in families.items() for suffix in SAMPLE_SUFFIXES.get(kind, ("",))}
    assert used <= exposed, f"the dashboard asks for {sorted(used - exposed)}, which /metrics does not expose"

    def covered(family: str) -> bool:
        return any(name == family or name.startswith(family + "_") for name in used)

    # Every metric gateway/metrics.py and gateway/queue_gauges.py define has a panel (their listing, not repeated).
    registry, budget = CollectorRegistry(), LabelBudget()
    EventMetrics(registry, budget)
    gauges = QueueGauges(registry, budget, ttl=0)
    operator = {family.name for family in (*registry.collect(), *gauges.describe())}
    assert {"cp_queue_tasks", "cp_tasks_finished"} <= operator
    assert [family for family in sorted(operator | {"cp_projection_lag_events"}) if not covered(family)] == []
