"""Signals and durable signal waits in the pure task decider: every signal is delivered at most once, in
the order it was sent per name, and none is lost, whatever the interleaving of sends, waits, timeouts
and late timers; a waiting task is never claimable."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.domain.commands import Actor, CancelTask, ClaimTask, Command, SignalTask, SubmitTask, WaitForSignal
from core.domain.decider import DecisionContext, Timer
from core.domain.errors import (
    AlreadyTerminal,
    InvalidCommand,
    InvalidTransition,
    LeaseLost,
    NotPermitted,
    NotReady,
)
from core.domain.events import Event, SignalConsumed, SignalWaitTimedOut, decode_event, encode_event
from core.domain.signals import MAX_PENDING_SIGNALS
from core.domain.task import Task
from core.domain.task_decider import TASK

START = datetime(2026, 3, 1, tzinfo=UTC)
SUBMITTER = Actor("key:submitter", frozenset({"submitter"}))
RUNNER = Actor("key:runner", frozenset({"worker"}))
NAMES = ("approve", "input", "stop")


class Harness:
    """A task driven through decide/evolve only, with the timers its states arm, as the store would."""

    def __init__(self) -> None:
        self.now = START
        self.state: Task | None = None
        self.events: list[Event] = []
        self.armed: list[Timer] = []
        self.leases = 0
        self.run(SubmitTask(task_id="t1", task_type="chat", queue="default"), SUBMITTER)

    def run(self, command: Command, actor: Actor) -> list[Event]:
        events = list(TASK.decide(self.state, command, DecisionContext(org="acme", now=self.now, actor=actor)))
        self.apply(events)
        return events

    def apply(self, events: list[Event]) -> None:
        before = {t.key: t for t in TASK.timers(self.state)}
        for event in events:
            self.state = TASK.evolve(self.state, event)
            self.events.append(event)
        self.armed += [t for t in TASK.timers(self.state) if before.get(t.key) != t]

    @property
    def task(self) -> Task:
        assert self.state is not None
        return self.state

    def claim(self) -> str:
        self.leases += 1
        lease_id = f"l{self.leases}"
        self.run(ClaimTask(task_id="t1", worker_id="w1", lease_id=lease_id), RUNNER)
        return lease_id

    def wait(self, name: str, timeout: float | None = None) -> list[Event]:
        lease = self.task.lease
        assert lease is not None
        command = WaitForSignal(
            task_id="t1",
            worker_id="w1",
            lease_id=lease.id,
            index=len(self.task.journal),
            name=name,
            timeout_seconds=timeout,
        )
        return self.run(command, RUNNER)

    def signal(self, name: str, payload: Any) -> None:
        self.run(SignalTask(task_id="t1", name=name, payload=payload), SUBMITTER)

    def time_passes(self, seconds: float) -> None:
        """Fires every armed timer that is due, even one whose wait has ended since (cancelling a
        timer may fail, so it may still fire)."""
        self.now += timedelta(seconds=seconds)
        due = sorted((t for t in self.armed if t.event.at <= self.now), key=lambda t: t.event.at)
        self.armed = [t for t in self.armed if t.event.at > self.now]
        for timer in due:
            self.apply([timer.event])

    def delivered(self) -> list[tuple[int, dict[str, Any] | None]]:
        return [(e.index, e.result) for e in self.task.journal if e.kind == "signal"]


# --- the property -----------------------------------------------------------------------------------

actions = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from(NAMES)),
        st.tuples(st.just("wait"), st.sampled_from(NAMES), st.none() | st.sampled_from([1.0, 5.0, 30.0])),
        st.tuples(st.just("time"), st.sampled_from([0.5, 2.0, 10.0, 60.0])),
        st.tuples(st.just("replay-late-timer")),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(actions=actions)
def test_every_signal_is_delivered_once_in_send_order_and_none_is_lost(actions: list[tuple[Any, ...]]) -> None:
    h = Harness()
    h.claim()
    sent: dict[str, list[int]] = defaultdict(list)
    fired_timers: list[Event] = []
    for number, action in enumerate(actions):
        match action:
            case ("send", name):
                h.signal(name, {"n": number})
                sent[name].append(number)
            case ("wait", name, timeout):
                if h.task.signal_wait is not None:
                    with pytest.raises(NotReady):  # the workflow is suspended: no runner can pick it up
                        h.claim()
                    continue
                if h.task.status == "pending":
                    h.claim()  # the wait before this one ended: the next claim replays and goes on
                kept = [s.payload["n"] for s in h.task.signals if s.name == name]
                events = h.wait(name, timeout)
                if kept:  # sent before the wait: taken at once, the earliest of its name, the lease kept
                    assert isinstance(events[0], SignalConsumed)
                    assert h.delivered()[-1][1]["payload"] == {"n": kept[0]}  # type: ignore[index]
                    assert h.task.status == "running"
                else:
                    assert h.task.signal_wait is not None and h.task.lease is None
                    assert h.task.status == "pending", "waiting stays within the contract's statuses"
            case ("time", seconds):
                before = len(h.events)
                h.time_passes(seconds)
                fired_timers += [e for e in h.events[before:] if isinstance(e, SignalWaitTimedOut)]
            case ("replay-late-timer",):
                if fired_timers and h.task.signal_wait is None:
                    before_state = h.task
                    h.apply([fired_timers[-1]])
                    assert h.task == before_state, "a timer firing after its wait ended changes nothing"

    delivered: dict[str, list[int]] = defaultdict(list)
    for index, result in h.delivered():
        if result is not None:
            assert result["by"] == SUBMITTER.id
            delivered[result["name"]].append(result["payload"]["n"])
        else:
            assert h.task.journal[index].name in NAMES
    every_delivery = [n for numbers in delivered.values() for n in numbers]
    assert len(every_delivery) == len(set(every_delivery)), "a signal is delivered at most once"
    for name in NAMES:
        still_kept = [s.payload["n"] for s in h.task.signals if s.name == name]
        assert delivered[name] + still_kept == sent[name], "in send order per name, and none lost"
    assert [s.number for s in h.task.signals] == sorted(s.number for s in h.task.signals), "kept in arrival order"
    assert h.task.signals_received == sum(len(numbers) for numbers in sent.values())
    assert TASK.fold(h.events) == h.state, "the state is the fold of the log"
    assert [decode_event(encode_event(e)) for e in h.events] == h.events


@settings(max_examples=200, deadline=None)
@given(
    timeout=st.sampled_from([1.0, 5.0]),
    signal_after=st.none() | st.sampled_from([0.5, 2.0, 10.0]),
)
def test_a_wait_returns_the_signal_that_came_in_time_or_none_at_its_timeout(
    timeout: float, signal_after: float | None
) -> None:
    h = Harness()
    h.claim()
    h.wait("input", timeout)
    if signal_after is not None:
        h.time_passes(signal_after)
        h.signal("input", {"late": signal_after})
    h.time_passes(60)
    [(_, result)] = h.delivered()
    if signal_after is not None and signal_after < timeout:
        assert result is not None and result["payload"] == {"late": signal_after}
    else:
        assert result is None, "timed out: the wait returns None"
        if signal_after is not None:  # sent after the timeout: kept for the next wait
            assert [s.payload for s in h.task.signals] == [{"late": signal_after}]
    assert h.task.signal_wait is None and h.task.status == "pending"
    h.claim()  # claimable again: the next claim replays to the wait and returns its result


# --- the rules, one by one -------------------------------------------------------------------------


def test_a_signal_arriving_during_a_wait_becomes_its_result_and_opens_the_task() -> None:
    h = Harness()
    h.claim()
    h.wait("approve")
    assert [t.key for t in TASK.timers(h.state)] == [], "a wait without a timeout arms no timer"
    with pytest.raises(NotReady, match="waits for a signal 'approve'"):
        h.claim()
    h.signal("other", 1)  # another name: kept, the wait goes on
    assert h.task.signal_wait is not None
    h.now += timedelta(seconds=3)
    h.signal("approve", {"ok": True})
    assert h.task.signal_wait is None and h.task.status == "pending"
    entry = h.task.journal[-1]
    assert (entry.index, entry.kind, entry.name) == (0, "signal", "approve")
    assert entry.result == {
        "name": "approve",
        "payload": {"ok": True},
        "by": SUBMITTER.id,
        "at": "2026-03-01T00:00:03Z",
    }
    assert [s.name for s in h.task.signals] == ["other"]
    h.claim()


def test_a_consumed_event_that_does_not_name_the_earliest_kept_signal_changes_nothing() -> None:
    h = Harness()
    lease = h.claim()
    h.signal("input", "first")
    h.signal("input", "second")
    before = h.task
    h.apply([SignalConsumed(at=h.now, index=0, name="input", number=2, worker_id="w1", lease_id=lease)])
    assert h.task == before
    h.wait("input")
    assert h.delivered()[0][1]["payload"] == "first"  # type: ignore[index]


def test_only_admins_submitters_and_approvers_signal_and_never_a_terminal_task() -> None:
    h = Harness()
    for refused in (Actor("key:w", frozenset({"worker"})), Actor("key:v", frozenset({"viewer"}))):
        with pytest.raises(NotPermitted):
            h.run(SignalTask(task_id="t1", name="go"), refused)
    for allowed in ("admin", "submitter", "approver"):
        h.run(SignalTask(task_id="t1", name="go"), Actor(f"key:{allowed}", frozenset({allowed})))
    assert [s.by for s in h.task.signals] == ["key:admin", "key:submitter", "key:approver"]
    assert h.task.signals[0].payload == {}, "the payload defaults to an empty object"
    h.run(CancelTask(task_id="t1"), SUBMITTER)
    with pytest.raises(AlreadyTerminal):
        h.signal("go", None)


def test_a_task_keeps_a_bounded_number_of_signals_nobody_waits_for() -> None:
    h = Harness()
    for n in range(MAX_PENDING_SIGNALS):
        h.signal("flood", n)
    with pytest.raises(InvalidTransition, match="signals no wait has taken"):
        h.signal("flood", "one too many")
    assert len(h.task.signals) == MAX_PENDING_SIGNALS


def test_a_wait_is_lease_bound_and_only_at_the_next_journal_position() -> None:
    h = Harness()
    lease = h.claim()
    with pytest.raises(InvalidCommand, match="next one is index 0"):
        h.run(WaitForSignal(task_id="t1", worker_id="w1", lease_id=lease, index=1, name="go"), RUNNER)
    with pytest.raises(LeaseLost):
        h.run(WaitForSignal(task_id="t1", worker_id="w1", lease_id="other", index=0, name="go"), RUNNER)
    with pytest.raises(LeaseLost):  # another credential, even with the lease's id
        h.run(WaitForSignal(task_id="t1", worker_id="w1", lease_id=lease, index=0, name="go"), SUBMITTER)
    h.wait("go", timeout=10)
    with pytest.raises(LeaseLost):  # released: a second wait from the old lease is refused
        h.run(WaitForSignal(task_id="t1", worker_id="w1", lease_id=lease, index=1, name="go"), RUNNER)
    [timer] = TASK.timers(h.state)
    assert timer.event == SignalWaitTimedOut(at=START + timedelta(seconds=10), index=0)


def test_cancelling_a_waiting_task_ends_the_wait_and_its_timer() -> None:
    h = Harness()
    h.claim()
    h.wait("go", timeout=10)
    h.run(CancelTask(task_id="t1"), SUBMITTER)
    assert not TASK.timers(h.state)
    before = h.task
    h.time_passes(20)
    assert h.task == before
