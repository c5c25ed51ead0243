"""The shipped policies keep their promises on every engine that can run them, and the engines agree.

regopy always runs. The OPA-wasm engine runs when `policies_wasm/build/bundle.tar.gz` exists and was
built (by policies_wasm/build.sh, which needs the `opa` CLI) from the current sources.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies_wasm.engine import SOURCES_DIR, Bundle, PolicyEngine, canonical_json, default_bundle, sha256_digest
from policies_wasm.opa_wasm import OpaWasmEngine
from policies_wasm.rego import RegoEngine
from tests.policies.shipped_cases import ACME, CASES, SUBMIT, TOOL, Case, with_test_orgs

SOURCES = with_test_orgs(Bundle.from_dir(SOURCES_DIR))
_shipped = default_bundle()
COMPILED = with_test_orgs(_shipped) if _shipped.wasm is not None else None
needs_compiled = pytest.mark.skipif(
    COMPILED is None,
    reason="no compiled policies_wasm/build/bundle.tar.gz for the current sources (build.sh needs the opa CLI)",
)


def _regopy() -> PolicyEngine:
    engine = RegoEngine()
    engine.load(SOURCES)
    return engine


def _wasm() -> PolicyEngine:
    assert COMPILED is not None
    engine = OpaWasmEngine()
    engine.load(COMPILED)
    return engine


@pytest.fixture(
    scope="module",
    params=[pytest.param(_regopy, id="regopy"), pytest.param(_wasm, id="opa-wasm", marks=needs_compiled)],
)
def engine(request: pytest.FixtureRequest) -> PolicyEngine:
    return request.param()


@pytest.fixture(scope="module")
def regopy() -> PolicyEngine:
    return _regopy()


@pytest.fixture(scope="module")
def wasm() -> PolicyEngine:
    if COMPILED is None:
        pytest.skip("no compiled policies_wasm/build/bundle.tar.gz for the current sources (build.sh needs opa)")
    return _wasm()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_shipped_policy_case(engine: PolicyEngine, case: Case) -> None:
    assert engine.evaluate(case.entrypoint, case.input).value == case.expected


def test_every_decision_names_its_engine_bundle_and_input(engine: PolicyEngine) -> None:
    request = {"org": "globex", "environment": "prod"}
    decision = engine.evaluate(SUBMIT, request)
    loaded = {"regopy": SOURCES, "opa-wasm": COMPILED}[engine.name]
    assert decision.engine == engine.name
    assert loaded is not None and decision.bundle_digest == loaded.digest
    assert decision.input_digest == sha256_digest(canonical_json(request))
    assert decision.entrypoint == SUBMIT
    assert decision.duration_ms > 0


# --- Inheritance: defaults → org → environment → queue → workflow -----------------------------------

DEFAULTS = SOURCES.data["policy_config"]["defaults"]


def effective(engine: PolicyEngine, **scope: str) -> dict[str, Any]:
    return engine.evaluate("controlplane/settings", scope).value


def test_an_org_without_settings_gets_the_defaults(engine: PolicyEngine) -> None:
    assert effective(engine, org="globex", environment="prod", queue="batch", workflow="agent-deploy") == DEFAULTS


def test_each_level_overrides_the_one_before(engine: PolicyEngine) -> None:
    assert effective(engine, org="acme")["approval_cost_usd"] == 5
    assert effective(engine, org="acme", environment="prod")["approval_cost_usd"] == 1
    assert effective(engine, org="acme", environment="prod", queue="batch")["approval_cost_usd"] == 20
    # The workflow does not set it, so the queue's value stands.
    assert (
        effective(engine, org="acme", environment="prod", queue="batch", workflow="agent-deploy")["approval_cost_usd"]
        == 20
    )


def test_null_lifts_a_limit_set_at_a_less_specific_level(engine: PolicyEngine) -> None:
    assert effective(engine, org="acme")["max_tokens_per_day"] == 1000
    assert effective(engine, org="acme", workflow="agent-deploy")["max_tokens_per_day"] is None


def test_keys_no_level_sets_keep_their_default(engine: PolicyEngine) -> None:
    merged = effective(engine, org="acme", environment="prod", queue="batch", workflow="agent-deploy")
    assert merged == {
        **DEFAULTS,
        **ACME["settings"],
        **ACME["environments"]["prod"],
        **ACME["queues"]["batch"],
        **ACME["workflows"]["agent-deploy"],
    }
    assert merged["approval_environments"] == ["prod"]


def test_unconfigured_levels_are_skipped(engine: PolicyEngine) -> None:
    assert effective(engine, org="acme", environment="staging", queue="batch") == {
        **DEFAULTS,
        **ACME["settings"],
        **ACME["queues"]["batch"],
    }


def test_shipped_defaults_have_no_object_values() -> None:
    # object.union merges nested objects in OPA but replaces them in rego-cpp: settings stay flat.
    assert not any(isinstance(value, dict) for value in DEFAULTS.values())


# --- Properties -------------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=2000)
# Costs with at most two decimals: the reasons print them, and every engine prints these alike.
costs = st.integers(min_value=0, max_value=10_000).map(lambda cents: cents / 100)
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3), st.lists(st.integers(-5, 5), max_size=2)
)


def field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well-typed values, sometimes anything."""
    return st.one_of(good, good, good, junk)


usage = st.fixed_dictionaries({}, optional={"org_in_flight": counts, "queue_in_flight": counts, "tokens_today": counts})
scope_fields = {
    "environment": field(st.sampled_from(["prod", "dev", "staging"])),
    "queue": field(st.sampled_from(["batch", "default"])),
    "workflow": field(st.sampled_from(["agent-deploy", "report"])),
    "usage": field(usage),
    "estimated_cost_usd": field(costs),
}
orgs = field(st.sampled_from(["acme", "globex", "initech", ""]))
submit_inputs = st.fixed_dictionaries(
    {"org": orgs},
    optional={
        **scope_fields,
        "task_type": field(st.sampled_from(["deploy", "report"])),
        "tools": field(st.lists(st.sampled_from(["shell", "search", "github.create_pr"]), max_size=3)),
        "models": field(st.lists(st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "claude-3"]), max_size=2)),
        "payload_bytes": field(st.integers(0, 5000)),
    },
)
tool_inputs = st.fixed_dictionaries(
    {"org": orgs},
    optional={
        **scope_fields,
        "tool": field(st.sampled_from(["shell", "search", "github.create_pr"])),
        "model": field(st.sampled_from(["gpt-4o", "gpt-3.5-turbo", "claude-3"])),
        "tokens_requested": field(counts),
    },
)
requests = st.one_of(
    submit_inputs.map(lambda request: (SUBMIT, request)), tool_inputs.map(lambda request: (TOOL, request))
)
checks = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@checks
@given(request=requests)
def test_every_decision_is_well_formed_and_explained(regopy: PolicyEngine, request: tuple[str, Any]) -> None:
    entrypoint, value = request
    decision = regopy.evaluate(entrypoint, value).value
    assert set(decision) == {"allow", "require_approval", "reasons"}
    assert isinstance(decision["allow"], bool) and isinstance(decision["require_approval"], bool)
    assert decision["reasons"] == sorted(decision["reasons"])
    assert all(isinstance(reason, str) for reason in decision["reasons"])
    if not decision["allow"]:
        assert decision["reasons"] and not decision["require_approval"]
    if decision["require_approval"]:
        assert decision["reasons"]


@checks
@given(request=submit_inputs, cheaper=costs, costlier=costs)
def test_a_costlier_submission_is_never_treated_more_leniently(
    regopy: PolicyEngine, request: dict[str, Any], cheaper: float, costlier: float
) -> None:
    cheaper, costlier = sorted((cheaper, costlier))
    low = regopy.evaluate(SUBMIT, {**request, "estimated_cost_usd": cheaper}).value
    high = regopy.evaluate(SUBMIT, {**request, "estimated_cost_usd": costlier}).value
    if not low["allow"]:
        assert not high["allow"]
    if low["require_approval"] and high["allow"]:
        assert high["require_approval"]


@checks
@given(request=submit_inputs)
def test_key_order_changes_neither_the_decision_nor_its_digest(regopy: PolicyEngine, request: dict[str, Any]) -> None:
    reordered = dict(reversed(list(request.items())))
    first, second = regopy.evaluate(SUBMIT, request), regopy.evaluate(SUBMIT, reordered)
    assert (first.value, first.input_digest) == (second.value, second.input_digest)


@checks
@given(request=requests)
def test_both_engines_agree(regopy: PolicyEngine, wasm: PolicyEngine, request: tuple[str, Any]) -> None:
    entrypoint, value = request
    assert wasm.evaluate(entrypoint, value).value == regopy.evaluate(entrypoint, value).value
