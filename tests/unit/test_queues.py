"""Queue settings (``core.domain.queues``) and the claim strategies (``application.claim_index.choose_waiter``): the
decider keeps exactly the settings last given per queue, a queue without settings has the defaults,
and each strategy picks the waiter it promises."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from application.claim_index import Waiter, choose_waiter
from core.domain.commands import (
    DEFAULT_BREAKER_COOLDOWN_SECONDS,
    DEFAULT_BREAKER_FAILURES,
    Actor,
    ConfigureQueue,
    RecordWorkerAttempt,
    RegisterWorker,
    RemoveQueueSettings,
)
from core.domain.decider import DecisionContext
from core.domain.errors import NotFound
from core.domain.events import WorkerBreakerOpened
from core.domain.queues import QUEUES, Queues
from core.domain.worker import WORKER

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
ADMIN = DecisionContext(org="acme", now=NOW, actor=Actor(id="key:admin", roles=frozenset({"admin"})))
STRATEGIES = ("fifo", "least_loaded", "round_robin", "random")

queue_names = st.sampled_from(["q1", "q2", "q3"])
configure = st.builds(
    ConfigureQueue,
    queue=queue_names,
    strategy=st.sampled_from(STRATEGIES),
    breaker_failures=st.integers(1, 10),
    breaker_cooldown_seconds=st.floats(1, 3600),
)
commands = st.lists(st.one_of(configure, st.builds(RemoveQueueSettings, queue=queue_names)), max_size=20)


@given(commands)
def test_a_queue_has_the_settings_last_given_or_the_defaults(
    history: list[ConfigureQueue | RemoveQueueSettings],
) -> None:
    state, expected = QUEUES.initial, {}
    for command in history:
        try:
            events = QUEUES.decide(state, command, ADMIN)
        except NotFound:
            assert isinstance(command, RemoveQueueSettings) and command.queue not in expected
            continue
        state = QUEUES.fold(events, state)
        if isinstance(command, ConfigureQueue):
            expected[command.queue] = command
        else:
            del expected[command.queue]
    assert isinstance(state, Queues)
    assert [settings.queue for settings in state.listed()] == sorted(expected)
    for name in ("q1", "q2", "q3"):
        settings = state.of(name)
        given_ = expected.get(name)
        if given_ is None:
            assert (settings.configured, settings.strategy) == (False, "fifo")
            assert (settings.breaker_failures, settings.breaker_cooldown_seconds) == (
                DEFAULT_BREAKER_FAILURES,
                DEFAULT_BREAKER_COOLDOWN_SECONDS,
            )
        else:
            assert settings.configured and settings.configured_by == "key:admin"
            assert (settings.strategy, settings.breaker_failures, settings.breaker_cooldown_seconds) == (
                given_.strategy,
                given_.breaker_failures,
                given_.breaker_cooldown_seconds,
            )


@given(st.integers(1, 8), st.floats(1, 3600))
def test_a_workers_breaker_opens_after_its_queues_count_of_failures_for_its_cooldown(
    failures: int, cooldown: float
) -> None:
    worker = WORKER.fold(WORKER.decide(None, RegisterWorker(worker_id="w", queue="q"), ADMIN))
    for attempt in range(1, failures + 1):
        command = RecordWorkerAttempt(
            worker_id="w",
            task_id=f"t{attempt}",
            outcome="failed",
            breaker_failures=failures,
            breaker_cooldown_seconds=cooldown,
        )
        events = WORKER.decide(worker, command, ADMIN)
        opened = [event for event in events if isinstance(event, WorkerBreakerOpened)]
        assert bool(opened) == (attempt == failures)
        worker = WORKER.fold(events, worker)
    assert worker is not None and worker.breaker_open_until is not None
    assert (worker.breaker_open_until - NOW).total_seconds() == pytest.approx(cooldown)


def waiters(worker_ids: list[str]) -> list[Waiter]:
    loop = asyncio.new_event_loop()
    try:
        return [
            Waiter(worker, frozenset(), False, "fifo", arrived, loop.create_future())
            for arrived, worker in enumerate(worker_ids)
        ]
    finally:
        loop.close()


def no_load(worker_id: str) -> int:
    return 0


@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=8))
def test_fifo_wakes_the_claimer_waiting_longest(worker_ids: list[str]) -> None:
    eligible = waiters(worker_ids)
    assert choose_waiter("fifo", eligible, load=no_load, last_woken=None, rng=Random(1)) is eligible[0]


@given(
    st.lists(st.sampled_from("abcd"), min_size=1, max_size=8),
    st.dictionaries(st.sampled_from("abcd"), st.integers(0, 5)),
)
def test_least_loaded_wakes_a_worker_holding_the_fewest_leases_then_the_longest_waiting(
    worker_ids: list[str], loads: dict[str, int]
) -> None:
    eligible = waiters(worker_ids)
    chosen = choose_waiter("least_loaded", eligible, load=lambda w: loads.get(w, 0), last_woken=None, rng=Random(1))
    fewest = min(loads.get(worker, 0) for worker in worker_ids)
    assert loads.get(chosen.worker_id or "", 0) == fewest
    assert chosen is next(w for w in eligible if loads.get(w.worker_id or "", 0) == fewest)


def test_round_robin_serves_every_waiting_worker_in_turn() -> None:
    eligible = waiters(["c", "a", "d", "b"])
    served, last = [], None
    for _ in range(12):
        chosen = choose_waiter("round_robin", eligible, load=no_load, last_woken=last, rng=Random(1))
        served.append(chosen.worker_id)
        last = chosen.worker_id
    assert served == ["a", "b", "c", "d"] * 3


@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=10, unique=True), st.sampled_from("abcdef"))
def test_round_robin_wakes_the_next_worker_id_after_the_last_one_woken(worker_ids: list[str], last: str) -> None:
    chosen = choose_waiter("round_robin", waiters(worker_ids), load=no_load, last_woken=last, rng=Random(1))
    later = sorted(worker for worker in worker_ids if worker > last)
    assert chosen.worker_id == (later[0] if later else min(worker_ids))


def test_random_spreads_wakes_evenly_with_a_fixed_seed() -> None:
    eligible = waiters(["a", "b", "c", "d"])
    rng = Random(20261206)
    counts = Counter(
        choose_waiter("random", eligible, load=no_load, last_woken=None, rng=rng).worker_id for _ in range(4000)
    )
    # Chi-square with 3 degrees of freedom: 16.27 is its 0.999 quantile.
    chi_square = sum((count - 1000) ** 2 / 1000 for count in counts.values())
    assert set(counts) == {"a", "b", "c", "d"} and chi_square < 16.27, counts
