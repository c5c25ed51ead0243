"""``controlplane/submit_usage`` names exactly the usage facts ``controlplane/submit`` reads, whatever the
org's quotas at each level: the gateway passes only the named facts (and reads the day's spend only when
one is named), so a fact the declaration leaves out must not change any decision, and a fact it names
must be one the decision needs (without it, the decision denies for want of it)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies_wasm.engine import SOURCES_DIR, Bundle
from policies_wasm.rego import RegoEngine
from tests.policies.shipped_cases import SUBMIT, SUBMIT_USAGE

SOURCES = Bundle.from_dir(SOURCES_DIR)
ORG = "acme"
QUOTAS = {
    "max_tasks_in_flight_per_org": "org_in_flight",
    "max_tasks_in_flight_per_queue": "queue_in_flight",
    "max_tokens_per_day": "tokens_today",
    "max_cost_usd_per_day": "cost_today_usd",
}
ENVIRONMENTS, QUEUES, WORKFLOWS = ["prod", "dev"], ["batch", "default"], ["agent-deploy", "report"]

# Small limits and counts, so that counts land below, at and above the limits alike.
limits = st.one_of(st.none(), st.integers(0, 6), st.sampled_from([0.5, 2.25]))
level = st.dictionaries(st.sampled_from(sorted(QUOTAS)), limits)


def levels(names: list[str]) -> st.SearchStrategy[dict[str, dict[str, Any]]]:
    return st.dictionaries(st.sampled_from(names), level)


org_configs = st.fixed_dictionaries(
    {},
    optional={
        "settings": level,
        "environments": levels(ENVIRONMENTS),
        "queues": levels(QUEUES),
        "workflows": levels(WORKFLOWS),
    },
)
defaults = st.fixed_dictionaries({}, optional=dict.fromkeys(QUOTAS, limits))
# What the gateway passes: non-negative counts, and spend in cents.
usages = st.fixed_dictionaries(
    {
        "org_in_flight": st.integers(0, 8),
        "queue_in_flight": st.integers(0, 8),
        "tokens_today": st.integers(0, 8),
        "cost_today_usd": st.integers(0, 400).map(lambda cents: cents / 100),
    }
)
submissions = st.fixed_dictionaries(
    {"org": st.sampled_from([ORG, "globex"])},
    optional={
        "environment": st.sampled_from([*ENVIRONMENTS, "staging"]),
        "queue": st.one_of(st.sampled_from(QUEUES), st.just(3)),  # a malformed queue is denied, with quotas too
        "workflow": st.sampled_from(WORKFLOWS),
        "task_type": st.sampled_from(["deploy", "report"]),
        "estimated_cost_usd": st.integers(0, 2000).map(lambda cents: cents / 100),
    },
)


@pytest.fixture(scope="module")
def engine() -> RegoEngine:
    return RegoEngine()


def configured(default_limits: dict[str, Any], org_config: dict[str, Any]) -> Bundle:
    data = copy.deepcopy(SOURCES.data)
    data["policy_config"]["defaults"].update(default_limits)
    data["policy_config"]["orgs"] = {ORG: org_config}
    return SOURCES.with_data(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(default_limits=defaults, org_config=org_configs, submission=submissions, usage=usages)
def test_the_decision_on_the_named_usage_facts_is_the_decision_on_all_of_them(
    engine: RegoEngine,
    default_limits: dict[str, Any],
    org_config: dict[str, Any],
    submission: dict[str, Any],
    usage: dict[str, Any],
) -> None:
    engine.load(configured(default_limits, org_config))
    named = engine.evaluate(SUBMIT_USAGE, submission).value
    assert named == sorted(set(named)) and set(named) <= set(usage)

    decided = engine.evaluate(SUBMIT, {**submission, "usage": usage}).value
    given_named = {name: count for name, count in usage.items() if name in named}
    assert engine.evaluate(SUBMIT, {**submission, "usage": given_named}).value == decided

    for name in named:
        without = {fact: count for fact, count in given_named.items() if fact != name}
        lacking = engine.evaluate(SUBMIT, {**submission, "usage": without}).value
        assert not lacking["allow"]
        assert any(f"input.usage.{name} is missing" in reason for reason in lacking["reasons"]), lacking
