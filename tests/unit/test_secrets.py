"""Property-based tests of secrets: the org's secrets aggregate numbers each name's versions 1, 2, …
whatever the interleaving of scopes and stale sets; a task reads its environment's version before the
org-wide one and never another environment's; a task's first read pins the version until it ends;
only the lease holder reads; and the envelope encryption binds a ciphertext to its org, name, version
and environment."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain.commands import (
    SYSTEM,
    Actor,
    ClaimTask,
    CompleteTask,
    ReadSecret,
    RewrapSecret,
    SetSecret,
    SubmitTask,
)
from core.domain.decider import DecisionContext
from core.domain.errors import AlreadyTerminal, LeaseLost, NotFound, Rejected
from core.domain.events import SecretRead, SecretVersionRewrapped, SecretVersionSet, decode_event, encode_event
from core.domain.public import REDACTED, public_bytes, public_view
from core.domain.secrets import SECRETS, AlreadyRewrapped, Secrets, VersionTaken
from core.domain.task import Task
from core.domain.task_decider import TASK
from core.secret_box import Sealed, SecretBox, SecretsKeyInvalid, SecretUnreadable, generate_key_text
from runners.verify import ReplayOnlyContext

START = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = ["DB_PASSWORD", "api.token", "deploy-key"]
ENVIRONMENTS = [None, "prod", "staging"]
WORKER = Actor("key:worker", frozenset({"worker"}))
OTHER_WORKER = Actor("key:other", frozenset({"worker"}))


def context(step: int = 0, actor: Actor = SYSTEM) -> DecisionContext:
    return DecisionContext(org="acme", now=START + timedelta(seconds=step), actor=actor)


def sealed_set(name: str, environment: str | None, version: int) -> SetSecret:
    return SetSecret(
        name=name,
        environment=environment,
        version=version,
        key_id="k1",
        wrapped_key=b"wrapped",
        nonce=b"nonce",
        ciphertext=f"{name}:{version}".encode(),
    )


sets = st.builds(
    lambda name, environment, stale: (name, environment, stale),
    st.sampled_from(NAMES),
    st.sampled_from(ENVIRONMENTS),
    st.integers(min_value=0, max_value=2),
)


@given(st.lists(sets, max_size=30))
def test_each_name_counts_its_versions_from_one_and_a_stale_seal_changes_nothing(
    attempts: list[tuple[str, str | None, int]],
) -> None:
    state = SECRETS.initial
    recorded = []
    model: dict[str, list[str | None]] = {}  # name -> the environment of each version, in order
    for step, (name, environment, stale) in enumerate(attempts):
        version = len(model.get(name, [])) + 1 - stale  # sealed for the next version, or for an older state
        if version < 1:
            continue
        try:
            events = SECRETS.decide(state, sealed_set(name, environment, version), context(step))
        except VersionTaken:
            assert stale > 0
            continue
        assert stale == 0
        for event in events:
            assert decode_event(encode_event(event)) == event
            state = SECRETS.evolve(state, event)
            recorded.append(event)
        model.setdefault(name, []).append(environment)

    assert SECRETS.fold(recorded) == state
    for name, environments in model.items():
        assert [found.version for found in state.by_name[name]] == list(range(1, len(environments) + 1))
        for environment in ENVIRONMENTS:
            newest = state.newest(name, environment)
            own = [i + 1 for i, env in enumerate(environments) if environment is not None and env == environment]
            org_wide = [i + 1 for i, env in enumerate(environments) if env is None]
            expected = (own or org_wide or [None])[-1]
            assert (None if newest is None else newest.version) == expected
            assert newest is None or newest.environment in (None, environment), "never another environment's"
    listed = state.listed()
    assert {(scope.name, scope.environment) for scope in listed} == {
        (name, env) for name, envs in model.items() for env in envs
    }
    assert all("ciphertext" not in msgspec.structs.asdict(scope) for scope in listed), "a listing holds no value"


def running_task(environment: str | None = None) -> Task:
    submit = SubmitTask(task_id="t1", task_type="deploy", environment=environment)
    task = TASK.fold(TASK.decide(None, submit, context()))
    claim = ClaimTask(task_id="t1", worker_id="w1", lease_id="l1", lease_seconds=600)
    task = TASK.fold(TASK.decide(task, claim, context(1, WORKER)), task)
    assert task is not None and task.status == "running"
    return task


def read(task: Task, name: str, newest: int | None, step: int = 2, actor: Actor = WORKER) -> tuple[Task, SecretRead]:
    command = ReadSecret(task_id="t1", worker_id="w1", lease_id="l1", name=name, newest_version=newest)
    events = TASK.decide(task, command, context(step, actor))
    [event] = events
    assert isinstance(event, SecretRead)
    folded = TASK.fold(events, task)
    assert folded is not None
    return folded, event


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.integers(min_value=1, max_value=9)), min_size=1, max_size=20))
def test_a_tasks_first_read_of_a_name_pins_its_version_until_the_task_ends(reads: list[tuple[str, int]]) -> None:
    task = running_task()
    first: dict[str, int] = {}
    for step, (name, newest) in enumerate(reads):
        task, event = read(task, name, newest, step=2 + step)
        first.setdefault(name, newest)
        assert event.version == first[name], "rotated or not, the task reads the version it read first"
        assert (event.read_by, event.worker_id) == (WORKER.id, "w1")
        assert decode_event(encode_event(event)) == event
    assert task.secret_pins == first
    assert task.journal == (), "a read is not a journal operation: replays are not checked against it"


def test_only_the_lease_holders_credential_reads_and_not_after_the_task_ended() -> None:
    task = running_task()
    with pytest.raises(LeaseLost):
        read(task, "DB_PASSWORD", 1, actor=OTHER_WORKER)
    with pytest.raises(LeaseLost):
        TASK.decide(
            task, ReadSecret(task_id="t1", worker_id="w1", lease_id="l0", name="x", newest_version=1), context()
        )
    done = TASK.fold(
        TASK.decide(task, CompleteTask(task_id="t1", worker_id="w1", lease_id="l1"), context(3, WORKER)), task
    )
    with pytest.raises(AlreadyTerminal):
        read(done, "DB_PASSWORD", 1, step=4)  # type: ignore[arg-type]


def test_a_name_set_for_no_scope_of_the_task_is_not_found_and_says_so() -> None:
    task = running_task(environment="prod")
    with pytest.raises(NotFound) as refused:
        read(task, "DB_PASSWORD", None)
    assert "DB_PASSWORD" in refused.value.detail and "environment prod" in refused.value.detail
    assert isinstance(refused.value, Rejected)


def test_an_environment_version_wins_over_the_org_wide_one_and_other_environments_never_apply() -> None:
    state = Secrets()
    for version, environment in enumerate([None, "staging", "prod", None], start=1):
        state = SECRETS.fold(SECRETS.decide(state, sealed_set("DB_PASSWORD", environment, version), context()), state)
    assert state.newest("DB_PASSWORD", "prod").version == 3  # type: ignore[union-attr]
    assert state.newest("DB_PASSWORD", "staging").version == 2  # type: ignore[union-attr]
    assert state.newest("DB_PASSWORD", "qa").version == 4  # type: ignore[union-attr]
    assert state.newest("DB_PASSWORD", None).version == 4  # type: ignore[union-attr]
    assert state.newest("OTHER", "prod") is None


# --- envelope encryption ----------------------------------------------------------------------------

values = st.text(min_size=12, max_size=200)  # shorter ones turn up in random bytes by chance


@given(values)
def test_a_sealed_value_opens_only_for_its_own_org_name_version_and_environment(value: str) -> None:
    box = SecretBox.from_text(generate_key_text())
    sealed = box.seal("acme", "DB_PASSWORD", 2, "prod", value)
    assert box.open("acme", "DB_PASSWORD", 2, "prod", sealed) == value
    assert value.encode() not in sealed.ciphertext + sealed.wrapped_key
    for moved in (
        ("globex", "DB_PASSWORD", 2, "prod"),
        ("acme", "OTHER", 2, "prod"),
        ("acme", "DB_PASSWORD", 1, "prod"),
        ("acme", "DB_PASSWORD", 2, None),
    ):
        with pytest.raises(SecretUnreadable) as refused:
            box.open(*moved, sealed)
        assert value not in str(refused.value)


def test_an_altered_ciphertext_or_another_master_key_is_refused_naming_the_key() -> None:
    box, other = SecretBox.from_text(generate_key_text()), SecretBox.from_text(generate_key_text())
    sealed = box.seal("acme", "token", 1, None, "s3cr3t-value")
    flipped = Sealed(
        sealed.key_id, sealed.wrapped_key, sealed.nonce, bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    )
    with pytest.raises(SecretUnreadable, match="altered or moved"):
        box.open("acme", "token", 1, None, flipped)
    with pytest.raises(SecretUnreadable, match=f"sealed with master key {box.key_id}.*holds {other.key_id}"):
        other.open("acme", "token", 1, None, sealed)
    assert box.fingerprint("token", "", "a") != box.fingerprint("token", "", "b")
    assert box.fingerprint("token", "", "a") != other.fingerprint("token", "", "a"), "keyed by the master key"


def test_a_rotated_master_key_seals_what_comes_and_the_keys_it_replaced_still_open_what_they_sealed() -> None:
    first, second, third = generate_key_text(), generate_key_text(), generate_key_text()
    before = SecretBox.from_text(first)
    sealed_first = before.seal("acme", "token", 1, None, "sealed-before-the-rotation")
    rotated = SecretBox.from_text(third, f" {second} ,{first},")
    assert rotated.key_id == SecretBox.from_text(third).key_id
    assert rotated.key_ids == {rotated.key_id, before.key_id, SecretBox.from_text(second).key_id}
    assert rotated.open("acme", "token", 1, None, sealed_first) == "sealed-before-the-rotation"
    sealed_third = rotated.seal("acme", "token", 2, None, "sealed-after")
    assert sealed_third.key_id == rotated.key_id != before.key_id
    with pytest.raises(SecretUnreadable, match=f"sealed with master key {rotated.key_id}.*CP_SECRETS_PREVIOUS_KEYS"):
        before.open("acme", "token", 2, None, sealed_third)
    dropped = SecretBox.from_text(third)  # the old key retired too early
    with pytest.raises(SecretUnreadable, match=f"sealed with master key {before.key_id}"):
        dropped.open("acme", "token", 1, None, sealed_first)
    assert rotated.fingerprint("token", "a") == dropped.fingerprint("token", "a"), "keyed by the sealing key only"
    assert SecretBox.from_env({"CP_SECRETS_KEY": third, "CP_SECRETS_PREVIOUS_KEYS": first}).key_ids == {
        rotated.key_id,
        before.key_id,
    }


@pytest.mark.parametrize("previous", ["not base64!", base64.b64encode(b"short").decode()])
def test_a_previous_key_that_is_not_32_bytes_of_base64_is_refused_naming_where_it_came_from(previous: str) -> None:
    with pytest.raises(SecretsKeyInvalid, match=r"CP_SECRETS_PREVIOUS_KEYS .*base64 of 32 random bytes"):
        SecretBox.from_text(generate_key_text(), f"{generate_key_text()},{previous}")


@pytest.mark.parametrize("text", ["", "not base64!", base64.b64encode(b"short").decode()])
def test_a_master_key_that_is_not_32_bytes_of_base64_is_refused_saying_how_to_make_one(text: str) -> None:
    with pytest.raises(SecretsKeyInvalid, match=r"CP_SECRETS_KEY .*base64 of 32 random bytes"):
        SecretBox.from_text(text)


@given(values)
def test_a_rewrapped_version_opens_with_the_new_key_alone_and_keeps_its_ciphertext(value: str) -> None:
    old_text, new_text = generate_key_text(), generate_key_text()
    old = SecretBox.from_text(old_text)
    sealed = old.seal("acme", "token", 3, "prod", value)
    rotated = SecretBox.from_text(new_text, old_text)
    moved = rotated.rewrap("acme", "token", 3, "prod", sealed)
    assert (moved.key_id, moved.nonce, moved.ciphertext) == (rotated.key_id, sealed.nonce, sealed.ciphertext)
    assert moved.wrapped_key != sealed.wrapped_key and value.encode() not in moved.wrapped_key
    assert SecretBox.from_text(new_text).open("acme", "token", 3, "prod", moved) == value
    with pytest.raises(SecretUnreadable):
        old.open("acme", "token", 3, "prod", moved)
    with pytest.raises(SecretUnreadable, match="altered or moved"):  # a re-wrap proves the value first
        rotated.rewrap("acme", "token", 3, None, sealed)


def test_a_rewrap_replaces_one_versions_key_and_a_second_one_from_the_old_key_is_refused() -> None:
    state = Secrets()
    for version, environment in ((1, None), (2, "prod")):
        [event] = SECRETS.decide(state, sealed_set("token", environment, version), context(version))
        state = SECRETS.evolve(state, event)
    rewrap = RewrapSecret(name="token", version=1, from_key_id="k1", key_id="k2", wrapped_key=b"wrapped-by-k2")
    [rewrapped] = SECRETS.decide(state, rewrap, context(3))
    assert isinstance(rewrapped, SecretVersionRewrapped) and decode_event(encode_event(rewrapped)) == rewrapped
    after = SECRETS.evolve(state, rewrapped)
    one, two = after.by_name["token"]
    assert (one.key_id, one.wrapped_key, one.ciphertext) == ("k2", b"wrapped-by-k2", b"token:1")
    assert two == state.by_name["token"][1] and after.next_version("token") == 3
    assert public_view(rewrapped)["wrapped_key"] == REDACTED
    with pytest.raises(AlreadyRewrapped, match="sealed by master key k2 now, not k1"):
        SECRETS.decide(after, rewrap, context(4))
    with pytest.raises(NotFound):
        SECRETS.decide(after, msgspec.structs.replace(rewrap, version=9), context(4))
    assert SECRETS.evolve(after, rewrapped) == after, "folding it again changes nothing"


def test_the_ciphertext_of_a_version_never_leaves_the_log() -> None:
    box = SecretBox.from_text(generate_key_text())
    sealed = box.seal("acme", "token", 1, None, "s3cr3t-value")
    event = SecretVersionSet(
        at=START, name="token", version=1, environment=None, set_by="key:admin", **sealed._asdict()
    )
    view = public_view(event)
    assert {view[name] for name in ("wrapped_key", "nonce", "ciphertext")} == {REDACTED}
    assert (view["name"], view["version"], view["key_id"]) == ("token", 1, box.key_id)
    public = msgspec.json.decode(public_bytes(encode_event(event)))
    assert public["ciphertext"] == REDACTED and public["wrapped_key"] == REDACTED


async def test_verification_answers_ctx_secret_with_a_stand_in_and_reads_nothing() -> None:
    task = {"id": "t1", "org": "acme", "queue": "q", "type": "deploy", "journal": [], "approvals": []}
    context = ReplayOnlyContext(task)
    assert await context.secret("DB_PASSWORD") == "[secret DB_PASSWORD]"
    assert context.replayed == 0 and context.exhausted is None, "a read takes no journal position"
