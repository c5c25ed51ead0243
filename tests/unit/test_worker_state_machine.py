"""Property-based tests of the worker aggregate: registration, heartbeats and liveness timers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from core.domain.commands import (
    SYSTEM,
    Command,
    DeregisterWorker,
    HeartbeatWorker,
    RegisterWorker,
    ReportWorkerFailure,
)
from core.domain.decider import DecisionContext, Timer
from core.domain.errors import NotFound, Rejected
from core.domain.events import Event, decode_event, encode_event
from core.domain.worker import WORKER, Worker

START = datetime(2026, 1, 1, tzinfo=UTC)


class WorkerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state: Worker | None = None
        self.events: list[Event] = []
        self.armed: list[Timer] = []
        self.now = START

    def run(self, command: Command) -> bool:
        try:
            events = WORKER.decide(self.state, command, DecisionContext(org="acme", now=self.now, actor=SYSTEM))
        except NotFound:
            assert self.state is None, "only an unknown worker is reported as not found"
            return False
        except Rejected as exc:
            raise AssertionError(f"unexpected rejection {exc!r}") from exc
        self.apply(events)
        return True

    def apply(self, events: list[Event] | tuple[Event, ...]) -> None:
        before = {t.key: t for t in WORKER.timers(self.state)}
        for event in events:
            self.state = WORKER.evolve(self.state, event)
            self.events.append(event)
        self.armed += [t for t in WORKER.timers(self.state) if before.get(t.key) != t]

    @rule(timeout=st.sampled_from([5.0, 30.0]), caps=st.sets(st.sampled_from(["gpu", "python"])))
    def register(self, timeout: float, caps: set[str]) -> None:
        assert self.run(RegisterWorker(worker_id="w1", capabilities=tuple(caps), heartbeat_timeout_seconds=timeout))
        assert self.state is not None
        assert self.state.status == "starting"

    @rule(status=st.sampled_from(["ready", "busy", "draining"]))
    def heartbeat(self, status: str) -> None:
        if self.run(HeartbeatWorker(worker_id="w1", status=status)):
            assert self.state is not None
            assert self.state.status == status
            assert self.state.last_heartbeat_at == self.now

    @rule()
    def report_failure(self) -> None:
        if self.run(ReportWorkerFailure(worker_id="w1", reason="out of memory")):
            assert self.state is not None
            assert self.state.status == "failed"

    @rule()
    def deregister(self) -> None:
        self.run(DeregisterWorker(worker_id="w1"))
        assert self.state is None

    @rule(seconds=st.sampled_from([1, 4, 10, 40]))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        due = sorted((t for t in self.armed if t.event.at <= self.now), key=lambda t: t.event.at)
        self.armed = [t for t in self.armed if t.event.at > self.now]
        for timer in due:
            self.apply([timer.event])

    @invariant()
    def offline_exactly_when_heartbeats_were_missed(self) -> None:
        if self.state is None or self.state.status == "failed":
            return
        overdue = self.now >= self.state.last_heartbeat_at + timedelta(seconds=self.state.heartbeat_timeout_seconds)
        assert (self.state.status == "offline") == overdue

    @invariant()
    def state_is_the_fold_of_the_log(self) -> None:
        assert WORKER.fold(self.events) == self.state
        assert [decode_event(encode_event(e)) for e in self.events] == self.events


WorkerMachine.TestCase.settings = settings(max_examples=500, stateful_step_count=30, deadline=None)
TestWorkerStateMachine = WorkerMachine.TestCase
