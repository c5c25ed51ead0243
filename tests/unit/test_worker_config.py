"""Property-based tests of an org's worker configuration aggregate: whatever the org and its
environments set, in any order, a worker gets its environment's settings field by field over the
org's, each set replaces its scope whole, and the state is the fold of the events recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from core.domain.commands import SYSTEM, LlmConfig, SetWorkerConfig
from core.domain.decider import DecisionContext
from core.domain.events import Event, WorkerConfigSet, decode_event, encode_event
from core.domain.worker_config import WORKER_CONFIG, WorkerConfig

START = datetime(2026, 1, 1, tzinfo=UTC)
ENVIRONMENTS = [None, "prod", "staging"]
FIELDS = ("heartbeat_interval_seconds", "lease_seconds", "api_base", "model_override", "fallbacks")

llm = st.builds(
    LlmConfig,
    api_base=st.none() | st.sampled_from(["http://litellm:4000", "https://llm.example"]),
    model_override=st.none() | st.sampled_from(["gpt-4o", "claude-3-5-sonnet"]),
    fallbacks=st.none() | st.lists(st.sampled_from(["gpt-4o-mini", "mistral"]), max_size=2).map(tuple),
)
set_config = st.builds(
    SetWorkerConfig,
    environment=st.sampled_from(ENVIRONMENTS),
    heartbeat_interval_seconds=st.none() | st.sampled_from([5.0, 10.0, 20.0]),
    lease_seconds=st.none() | st.sampled_from([15.0, 30.0, 120.0]),
    llm=llm,
)


def flat(config: WorkerConfig | SetWorkerConfig) -> dict[str, Any]:
    """The five settings of a configuration or a command, by name."""
    return {
        "heartbeat_interval_seconds": config.heartbeat_interval_seconds,
        "lease_seconds": config.lease_seconds,
        "api_base": config.llm.api_base,
        "model_override": config.llm.model_override,
        "fallbacks": config.llm.fallbacks,
    }


@given(st.lists(set_config, max_size=25), st.sampled_from(ENVIRONMENTS))
def test_a_worker_gets_its_environments_settings_field_by_field_over_the_orgs(
    commands: list[SetWorkerConfig], worker_environment: str | None
) -> None:
    state = WORKER_CONFIG.initial
    recorded: list[Event] = []
    last_set: dict[str | None, SetWorkerConfig] = {}  # the model: the latest set of each scope, whole
    for step, command in enumerate(commands):
        events = WORKER_CONFIG.decide(state, command, DecisionContext("acme", START + timedelta(seconds=step), SYSTEM))
        assert [type(event) for event in events] == [WorkerConfigSet]
        for event in events:
            assert decode_event(encode_event(event)) == event
            state = WORKER_CONFIG.evolve(state, event)
            recorded.append(event)
        last_set[command.environment] = command

    assert WORKER_CONFIG.fold(recorded) == state
    org = flat(last_set[None]) if None in last_set else dict.fromkeys(FIELDS)
    own = flat(last_set[worker_environment]) if worker_environment in last_set else dict.fromkeys(FIELDS)
    expected = {name: org[name] if own[name] is None else own[name] for name in FIELDS}
    assert flat(state.effective(worker_environment)) == expected
    assert flat(state.scope(worker_environment)) == own, "a scope shows what was set for it, without inheritance"


@given(set_config, set_config)
def test_setting_a_scope_again_replaces_it_whole(first: SetWorkerConfig, second: SetWorkerConfig) -> None:
    second = SetWorkerConfig(
        environment=first.environment,
        heartbeat_interval_seconds=second.heartbeat_interval_seconds,
        lease_seconds=second.lease_seconds,
        llm=second.llm,
    )
    context = DecisionContext("acme", START, SYSTEM)
    state = WORKER_CONFIG.fold(WORKER_CONFIG.decide(WORKER_CONFIG.initial, first, context))
    state = WORKER_CONFIG.fold(WORKER_CONFIG.decide(state, second, context), state)
    assert flat(state.scope(first.environment)) == flat(second), "nothing of the first set survives"


def test_an_environment_that_set_nothing_inherits_the_org_and_a_worker_outside_environments_gets_the_org() -> None:
    context = DecisionContext("acme", START, SYSTEM)
    org = SetWorkerConfig(lease_seconds=60, llm=LlmConfig(api_base="http://litellm:4000", fallbacks=("mistral",)))
    prod = SetWorkerConfig(environment="prod", llm=LlmConfig(model_override="gpt-4o"))
    state = WORKER_CONFIG.fold([*WORKER_CONFIG.decide(WORKER_CONFIG.initial, org, context)])
    state = WORKER_CONFIG.fold(WORKER_CONFIG.decide(state, prod, context), state)
    assert flat(state.effective("prod")) == {
        "heartbeat_interval_seconds": None,
        "lease_seconds": 60,
        "api_base": "http://litellm:4000",
        "model_override": "gpt-4o",
        "fallbacks": ("mistral",),
    }
    assert state.effective("staging") == state.effective(None) == state.org
