"""Property-based tests of a worker's restart (core/domain/worker.py incarnations, core/domain/task.py
``ReleaseLease``, application/incarnations.py ``held_leases``): a registration from a new process, and only
that, is a restart; the leases it finds are every lease the worker holds; releasing them never loses a
task, never touches a lease of another worker or of another credential, counts the attempt as an
expiry does, and the released lease's timer firing later changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from application.incarnations import RESTART_REASON, held_leases
from application.open_tasks import OpenTasks
from core.domain.commands import (
    Actor,
    ClaimTask,
    Command,
    CompleteTask,
    RegisterWorker,
    ReleaseLease,
    SubmitTask,
)
from core.domain.decider import DecisionContext
from core.domain.errors import AlreadyTerminal, LeaseLost, Rejected
from core.domain.events import (
    Event,
    TaskLeaseExpired,
    TaskLeaseReleased,
    WorkerRegistered,
    decode_event,
    encode_event,
)
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject
from core.domain.task import Task
from core.domain.task_decider import TASK
from core.domain.worker import WORKER, Worker, is_restart

START = datetime(2026, 1, 1, tzinfo=UTC)
RESTARTED = "w"
"""The worker whose process dies and registers again."""
WORKERS = (RESTARTED, "v")
OWN_KEY, OTHER_KEY = (
    Actor(id="key:own", roles=frozenset({"worker"})),
    Actor(id="key:other", roles=frozenset({"worker"})),
)
"""``OWN_KEY`` is the credential the restarted worker registers with again."""
TASKS = 5


def ctx(now: datetime, actor: Actor = OWN_KEY) -> DecisionContext:
    return DecisionContext(org="acme", now=now, actor=actor)


# --- which registration is a restart ----------------------------------------------------------------

incarnations = st.sampled_from([None, "p1", "p2", "p3"])


@given(st.lists(incarnations, min_size=1, max_size=12))
def test_only_a_registration_from_another_process_is_a_restart(sent: list[str | None]) -> None:
    """Model: the recorded incarnation is the last one a registration named; a registration is a
    restart iff the worker exists and it names an incarnation other than the recorded one."""
    state: Worker | None = None
    recorded: str | None = None
    for i, incarnation in enumerate(sent):
        [event] = WORKER.decide(state, RegisterWorker(worker_id=RESTARTED, incarnation=incarnation), ctx(START))
        assert isinstance(event, WorkerRegistered)
        assert event.restarted == (i > 0 and incarnation is not None and incarnation != recorded)
        assert event.restarted == is_restart(state, incarnation)
        state = WORKER.evolve(state, event)
        assert decode_event(encode_event(event)) == event
        recorded = incarnation if incarnation is not None else recorded
        assert state is not None and state.incarnation == recorded


def test_a_same_process_re_registration_after_a_blip_is_not_a_restart() -> None:
    first = WORKER.fold(WORKER.decide(None, RegisterWorker(worker_id=RESTARTED, incarnation="p1"), ctx(START)))
    [again] = WORKER.decide(first, RegisterWorker(worker_id=RESTARTED, incarnation="p1"), ctx(START))
    assert isinstance(again, WorkerRegistered) and not again.restarted


def test_an_event_recorded_before_incarnations_still_decodes() -> None:
    old = (
        b'{"type":"WorkerRegistered","v":1,"at":"2026-01-01T00:00:00Z","worker_id":"w","queue":"default",'
        b'"capabilities":[],"labels":{},"model":null,"provider":null,"heartbeat_timeout_seconds":30.0}'
    )
    event = decode_event(old)
    assert isinstance(event, WorkerRegistered) and event.incarnation is None and not event.restarted


# --- which leases are released --------------------------------------------------------------------


@dataclass
class Log:
    """Tasks driven through the real decider, every event kept as the stream holds it."""

    now: datetime = START
    states: dict[str, Task | None] = field(default_factory=dict)
    recorded: list[RecordedEvent] = field(default_factory=list)

    def run(self, task_id: str, command: Command, actor: Actor = OWN_KEY) -> list[Event]:
        try:
            events = list(TASK.decide(self.states.get(task_id), command, ctx(self.now, actor)))
        except Rejected:
            return []
        self.append(task_id, events)
        return events

    def append(self, task_id: str, events: list[Event]) -> None:
        subject = aggregate_subject("acme", "task", task_id)
        for event in events:
            self.states[task_id] = TASK.evolve(self.states.get(task_id), event)
            self.recorded.append(RecordedEvent(len(self.recorded) + 1, subject, event, self.now))

    def states_at(self, seq: int) -> dict[str, Task | None]:
        states: dict[str, Task | None] = {}
        for item in self.recorded[:seq]:
            task_id = item.subject.rsplit(".", 1)[1]
            states[task_id] = TASK.evolve(states.get(task_id), item.event)
        return states


def held_by(states: dict[str, Task | None], worker_id: str) -> dict[str, str]:
    return {
        task_id: task.lease.id
        for task_id, task in states.items()
        if task is not None
        and task.status == "running"
        and task.lease is not None
        and task.lease.worker_id == worker_id
    }


step = st.tuples(
    st.sampled_from(["claim", "complete", "expire", "tick"]),
    st.integers(0, TASKS - 1),
    st.sampled_from(WORKERS),
    st.sampled_from([OWN_KEY, OTHER_KEY]),
)


def history(steps: list[tuple[str, int, str, Actor]], max_retries: int) -> Log:
    log = Log()
    for i in range(TASKS):
        log.run(f"t{i}", SubmitTask(task_id=f"t{i}", task_type="job", max_retries=max_retries))
    for n, (action, index, worker_id, actor) in enumerate(steps):
        task_id = f"t{index}"
        task = log.states[task_id]
        assert task is not None
        if action == "claim":
            claim = ClaimTask(task_id=task_id, worker_id=worker_id, lease_id=f"l{n}", lease_seconds=3600)
            log.run(task_id, claim, actor)
        elif action == "complete" and task.lease is not None:
            holder = OWN_KEY if task.lease.holder == OWN_KEY.id else OTHER_KEY
            log.run(
                task_id, CompleteTask(task_id=task_id, worker_id=task.lease.worker_id, lease_id=task.lease.id), holder
            )
        elif action == "expire" and task.lease is not None:
            log.append(task_id, [TaskLeaseExpired(at=task.lease.expires_at, lease_id=task.lease.id)])  # the timer fires
        log.now += timedelta(seconds=1)
    return log


@settings(max_examples=300, deadline=None)
@given(
    st.lists(step, max_size=40),
    st.data(),
    st.integers(0, 2),
)
def test_the_leases_found_are_every_lease_the_worker_holds(
    steps: list[tuple[str, int, str, Actor]], data: st.DataObject, max_retries: int
) -> None:
    """Whatever checkpoint the read model's rows were read at (and however far past it they are), the
    rows plus the claims logged after the checkpoint name every lease the worker holds, with its id."""
    log = history(steps, max_retries)
    checkpoint = data.draw(st.integers(0, len(log.recorded)), label="checkpoint")
    rows_at = data.draw(st.integers(checkpoint, len(log.recorded)), label="rows read at")
    found = held_leases(held_by(log.states_at(rows_at), RESTARTED), log.recorded[checkpoint:], RESTARTED)
    assert held_by(log.states, RESTARTED).items() <= found.items()


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40), st.integers(0, 2), st.integers(0, 40), st.integers(0, 41))
def test_releasing_never_loses_a_task_nor_touches_another_workers_lease(
    steps: list[tuple[str, int, str, Actor]], max_retries: int, checkpoint: int, registered_before_step: int
) -> None:
    """The new process registered before step ``registered_before_step`` (its own claims may follow,
    as when a retried registration releases again): only what the old process held is released."""
    log = history(steps, max_retries)
    registered_at = START + timedelta(seconds=registered_before_step) - timedelta(milliseconds=500)
    before = dict(log.states)
    checkpoint = min(checkpoint, len(log.recorded))
    candidates = held_leases(held_by(log.states_at(checkpoint), RESTARTED), log.recorded[checkpoint:], RESTARTED)
    # The gateway asks to release every candidate (and a stale candidate must be refused): here, every
    # lease of every task, as the restarted worker's credential.
    for task_id, task in before.items():
        lease_ids = {candidates.get(task_id), task.lease.id if task and task.lease else None} - {None}
        for lease_id in sorted(lease_ids):  # type: ignore[type-var]
            release = ReleaseLease(
                task_id=task_id,
                worker_id=RESTARTED,
                lease_id=lease_id,
                reason=RESTART_REASON,
                claimed_before=registered_at,
            )
            log.run(task_id, release)
    for task_id, old in before.items():
        new = log.states[task_id]
        assert old is not None and new is not None
        lease = old.lease
        ours = old.status == "running" and lease is not None and lease.worker_id == RESTARTED
        ours = ours and lease is not None and lease.holder == OWN_KEY.id
        if not (ours and lease is not None and lease.claimed_at is not None and lease.claimed_at < registered_at):
            assert new == old, "a lease of another worker, credential or of the new process is never released"
            continue
        assert new.lease is None and new.assigned_worker is None
        if old.retries < old.max_retries:  # counted as an attempt, exactly as an expiry is
            assert (new.status, new.retries) == ("pending", old.retries + 1)
        else:
            assert new.status == "timed_out"
        assert new.error == {
            "reason": RESTART_REASON if new.status == "pending" else f"{RESTART_REASON} and retries are exhausted",
            "lease_id": old.lease.id,
        }
        assert candidates.get(task_id) == old.lease.id, "the gateway found it"


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2), st.booleans())
def test_a_released_leases_timer_firing_later_changes_nothing(max_retries: int, claimed_again: bool) -> None:
    log = history([], max_retries=max_retries)
    log.run("t0", ClaimTask(task_id="t0", worker_id=RESTARTED, lease_id="old", lease_seconds=30))
    log.now += timedelta(seconds=1)
    task = log.states["t0"]
    assert task is not None and task.lease is not None
    [timer] = [t for t in TASK.timers(task) if isinstance(t.event, TaskLeaseExpired)]
    again = ReleaseLease(
        task_id="t0", worker_id=RESTARTED, lease_id="old", reason=RESTART_REASON, claimed_before=log.now
    )
    [released] = log.run("t0", again)
    assert isinstance(released, TaskLeaseReleased)
    if claimed_again:  # by another worker, when retries are left
        log.run("t0", ClaimTask(task_id="t0", worker_id="v", lease_id="new", lease_seconds=30), OTHER_KEY)
    after = log.states["t0"]
    assert after is not None
    assert TASK.evolve(after, timer.event) == after, "the old lease's expiry folds as a no-op"
    assert not any(t.key == timer.key for t in TASK.timers(after)), "and the handler cancels it"
    index = OpenTasks()
    index.put("acme", after, len(log.recorded))
    fired = RecordedEvent(len(log.recorded) + 1, aggregate_subject("acme", "task", "t0"), timer.event, log.now)
    assert index.lease_expired(fired) is None, "so no breaker counts it as the worker's failed attempt"
    with pytest.raises((LeaseLost, AlreadyTerminal)):  # a retried registration releases nothing more
        TASK.decide(after, again, ctx(log.now))
