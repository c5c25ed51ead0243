"""Property-based tests of an org's environments aggregate: whatever commands arrive, in any order, a
queue belongs to at most one environment, a refused command changes nothing, and the state is the
fold of the events recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain.commands import SYSTEM, Actor, DefineEnvironment, DeleteEnvironment, SubmitTask
from core.domain.decider import DecisionContext
from core.domain.environments import ENVIRONMENTS, MAX_ENVIRONMENTS, Environments, QueueTaken
from core.domain.errors import AlreadyExists, InvalidCommand, NotFound, Rejected
from core.domain.events import EnvironmentDefined, Event, TaskSubmitted, decode_event, encode_event
from core.domain.task_decider import TASK

START = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = ["prod", "staging", "dev"]
QUEUES = ["q1", "q2", "q3", "q4"]


def context(step: int = 0) -> DecisionContext:
    return DecisionContext(org="acme", now=START + timedelta(seconds=step), actor=SYSTEM)


define = st.builds(
    DefineEnvironment,
    name=st.sampled_from(NAMES),
    queues=st.lists(st.sampled_from(QUEUES), max_size=4).map(tuple),
    labels=st.dictionaries(st.sampled_from(["tier", "region"]), st.sampled_from(["a", "b"]), max_size=2),
    replace=st.booleans(),
)
delete = st.builds(DeleteEnvironment, name=st.sampled_from(NAMES))


@given(st.lists(st.one_of(define, delete), max_size=30))
def test_a_queue_belongs_to_at_most_one_environment_whatever_the_commands(
    commands: list[DefineEnvironment | DeleteEnvironment],
) -> None:
    state = ENVIRONMENTS.initial
    recorded: list[Event] = []
    model: dict[str, tuple[str, ...]] = {}  # what the rules say the environments hold
    for step, command in enumerate(commands):
        try:
            events = ENVIRONMENTS.decide(state, command, context(step))
        except Rejected as refused:
            _refused_for_a_reason(model, command, refused)
            continue
        for event in events:
            assert decode_event(encode_event(event)) == event
            state = ENVIRONMENTS.evolve(state, event)
            recorded.append(event)
        if isinstance(command, DefineEnvironment):
            model[command.name] = command.queues
        else:
            del model[command.name]
        held = [queue for env in state.by_name.values() for queue in env.queues]
        assert len(held) == len(set(held)), f"a queue in two environments: {state}"
        assert {name: env.queues for name, env in state.by_name.items()} == model
        for queue in QUEUES:
            holder = state.of_queue(queue)
            assert (holder.name if holder else None) == next((n for n, qs in model.items() if queue in qs), None)
    assert ENVIRONMENTS.fold(recorded) == state, "the fold of the recorded events is the state"


def _refused_for_a_reason(
    model: dict[str, tuple[str, ...]], command: DefineEnvironment | DeleteEnvironment, refused: Rejected
) -> None:
    """Every refusal is one the rules call for, and says which."""
    if isinstance(command, DeleteEnvironment):
        assert isinstance(refused, NotFound) and command.name not in model
        return
    if isinstance(refused, AlreadyExists):
        assert command.name in model and not command.replace
    elif isinstance(refused, InvalidCommand):
        assert len(set(command.queues)) < len(command.queues)
        assert "listed twice" in refused.detail
    elif isinstance(refused, QueueTaken):
        taken = {q for name, qs in model.items() if name != command.name for q in qs}
        assert taken & set(command.queues)
        assert "belongs to environment" in refused.detail
    else:
        raise AssertionError(f"unexpected refusal {refused!r}")


def test_a_replaced_environment_keeps_when_it_was_created_and_says_who_changed_it() -> None:
    created = ENVIRONMENTS.fold(ENVIRONMENTS.decide(Environments(), DefineEnvironment(name="prod"), context(0)))
    admin = Actor(id="key:admin1", roles=frozenset({"admin"}))
    later = DecisionContext(org="acme", now=START + timedelta(hours=1), actor=admin)
    command = DefineEnvironment(name="prod", queues=("deploys",), labels={"tier": "1"}, replace=True)
    [event] = ENVIRONMENTS.decide(created, command, later)
    assert isinstance(event, EnvironmentDefined) and event.defined_by == "key:admin1"
    prod = ENVIRONMENTS.evolve(created, event).get("prod")
    assert prod is not None
    assert (prod.created_at, prod.updated_at, prod.queues, prod.labels) == (
        START,
        later.now,
        ("deploys",),
        {"tier": "1"},
    )


def test_moving_a_queue_takes_it_out_of_its_environment_first() -> None:
    state = Environments()
    for command in (DefineEnvironment(name="prod", queues=("q1", "q2")), DefineEnvironment(name="dev")):
        state = ENVIRONMENTS.fold(ENVIRONMENTS.decide(state, command, context()), state)
    with pytest.raises(QueueTaken, match="queue q2 belongs to environment prod"):
        ENVIRONMENTS.decide(state, DefineEnvironment(name="dev", queues=("q2",), replace=True), context())
    move = [
        DefineEnvironment(name="prod", queues=("q1",), replace=True),
        DefineEnvironment(name="dev", queues=("q2",), replace=True),
    ]
    for command in move:
        state = ENVIRONMENTS.fold(ENVIRONMENTS.decide(state, command, context()), state)
    assert state.of_queue("q2") is not None and state.of_queue("q2").name == "dev"  # type: ignore[union-attr]


def test_an_org_has_a_bounded_number_of_environments() -> None:
    state = Environments()
    for n in range(MAX_ENVIRONMENTS):
        state = ENVIRONMENTS.fold(ENVIRONMENTS.decide(state, DefineEnvironment(name=f"e{n}"), context()), state)
    with pytest.raises(Rejected, match=f"has {MAX_ENVIRONMENTS} environments"):
        ENVIRONMENTS.decide(state, DefineEnvironment(name="one-more"), context())
    ENVIRONMENTS.decide(
        state, DefineEnvironment(name="e0", queues=("q1",), replace=True), context()
    )  # replacing is fine


@pytest.mark.parametrize("name", ["prod\n", "Prod", "", "-prod", "p" * 64, "prod.eu", "prod eu"])
def test_an_environment_name_is_a_whole_token(name: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": name}, DefineEnvironment)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "prod", "queues": [name]}, DefineEnvironment)


def test_a_task_submitted_before_environments_existed_still_decodes_with_none() -> None:
    old = {
        "type": "TaskSubmitted",
        "v": 1,
        "at": "2026-01-01T00:00:00Z",
        "task_id": "t1",
        "org": "acme",
        "queue": "default",
        "task_type": "deploy",
        "payload": None,
        "priority": "normal",
        "required_capabilities": [],
        "max_retries": 3,
        "timeout_seconds": None,
        "retry_backoff_seconds": 1.0,
        "metadata": {"environment": "prod"},
        "workflow": None,
        "submitted_by": "key:k1",
    }
    event = decode_event(msgspec.json.encode(old))
    assert isinstance(event, TaskSubmitted) and event.environment is None


def test_a_task_records_the_environment_the_server_gave_it_not_its_metadata() -> None:
    command = SubmitTask(
        task_id="t1", task_type="deploy", queue="deploys", metadata={"environment": "dev"}, environment="prod"
    )
    [event] = TASK.decide(None, command, context())
    assert isinstance(event, TaskSubmitted) and event.environment == "prod"
    task = TASK.evolve(None, event)
    assert task is not None and task.environment == "prod"
    assert TASK.evolve(None, msgspec.structs.replace(event, environment=None)).environment is None  # type: ignore[union-attr]
