"""The schedule aggregate (core/domain/schedules.py): next fires strictly increase and follow the cron, a
downtime of any length is caught up by one run, the overlap policies, pause stops fires, a fire that is
not due records no run, fires land on their own subject (one on the schedule's, from an older release,
folds as nothing), and the state is always the fold of the recorded events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import given
from hypothesis import strategies as st

from core.domain.commands import (
    SYSTEM,
    CreateSchedule,
    DeleteSchedule,
    PauseSchedule,
    RecordScheduleRun,
    ResumeSchedule,
)
from core.domain.decider import DecisionContext
from core.domain.errors import AlreadyExists, InvalidCommand, NotFound
from core.domain.events import Event, ScheduleFired, decode_event, encode_event
from core.domain.schedules import (
    SCHEDULE,
    SCHEDULE_FIRES,
    FireNotDue,
    InvalidSchedule,
    Schedule,
    ScheduleState,
    check_cron,
    is_due,
    next_fire,
    overlap_action,
    run_task_id,
)

START = datetime(2026, 3, 1, 0, 0, 7, 250_000, tzinfo=UTC)
CRONS = ["* * * * *", "*/5 * * * *", "0 * * * *", "30 2 * * *", "0 9 * * MON-FRI", "*/10 * * * * *", "0 0 1 * *"]
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
TASK = {"type": "report", "payload": {"n": 1}}


def ctx(now: datetime) -> DecisionContext:
    return DecisionContext(org="acme", now=now, actor=SYSTEM)


class World:
    """A schedule and its log, with the fire timers delivered as the store would deliver them."""

    def __init__(self) -> None:
        self.state: ScheduleState = None
        self.events: list[Event] = []

    def run(self, command: object, now: datetime) -> list[Event]:
        events = list(SCHEDULE.decide(self.state, command, ctx(now)))  # type: ignore[arg-type]
        for event in events:
            self.apply(event)
        return events

    def apply(self, event: Event) -> None:
        assert decode_event(encode_event(event)) == event
        self.events.append(event)
        self.state = SCHEDULE.evolve(self.state, event)

    def armed(self) -> list[ScheduleFired]:
        timers = SCHEDULE.timers(self.state)
        assert all(timer.into == SCHEDULE_FIRES for timer in timers)  # fires land beside the schedule
        return [timer.event for timer in timers]  # type: ignore[misc]

    def fire_and_run(self, run_at: datetime) -> datetime:
        """Fire the armed timer (late if ``run_at`` is past it) and record its run at ``run_at``."""
        [fired] = self.armed()
        assert fired.at <= run_at
        assert is_due(self.state, fired.generation, fired.at)
        self.run(record(fired, task_id=f"t-{len(self.events)}"), run_at)
        assert not is_due(self.state, fired.generation, fired.at)  # a fire runs once
        return fired.at


def record(
    fired: ScheduleFired, *, task_id: str | None, outcome: str = "submitted", **fields: object
) -> RecordScheduleRun:
    return RecordScheduleRun(
        schedule_id="s1",
        fire_at=fired.at,
        generation=fired.generation,
        task_id=task_id,
        outcome=outcome,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


def cron_times(cron: str, zone: str, after: datetime, count: int) -> list[datetime]:
    it = CronSim(cron, after.astimezone(ZoneInfo(zone)))
    return [next(it).astimezone(UTC) for _ in range(count)]


@given(
    cron=st.sampled_from(CRONS),
    zone=st.sampled_from(ZONES),
    start=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
    lateness=st.lists(st.floats(min_value=0, max_value=0.9), min_size=1, max_size=8),
)
def test_fires_on_time_follow_the_cron_and_strictly_increase(
    cron: str, zone: str, start: datetime, lateness: list[float]
) -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron=cron, timezone=zone, task=TASK), start)
    fired: list[datetime] = []
    for late in lateness:
        due = world.armed()[0].at
        fired.append(world.fire_and_run(due + timedelta(seconds=late)))
    assert fired == cron_times(cron, zone, start, len(lateness))
    assert all(a < b for a, b in zip([start, *fired], fired, strict=False))
    assert all(moment.microsecond == 0 for moment in fired)


@given(
    cron=st.sampled_from(CRONS),
    zone=st.sampled_from(ZONES),
    after=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
)
def test_next_fire_is_strictly_later_and_monotonic(cron: str, zone: str, after: datetime) -> None:
    first = next_fire(cron, zone, after)
    assert first > after
    assert first.tzinfo is not None and first.utcoffset() == timedelta(0)
    assert next_fire(cron, zone, first) > first
    later = after + timedelta(seconds=37)
    assert next_fire(cron, zone, later) >= first  # a later "after" never gives an earlier fire


@given(
    cron=st.sampled_from(CRONS),
    zone=st.sampled_from(ZONES),
    after=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
    microseconds=st.integers(min_value=0, max_value=999_999),
)
def test_next_fire_remembered_per_second_is_cronsims_answer_for_every_instant_of_that_second(
    cron: str, zone: str, after: datetime, microseconds: int
) -> None:
    for moment in (after, after.replace(microsecond=microseconds)):  # the second call may hit the memo
        expected = next(CronSim(cron, moment.astimezone(ZoneInfo(zone)))).astimezone(UTC)
        assert next_fire(cron, zone, moment) == expected


@given(
    cron=st.sampled_from(["* * * * *", "*/5 * * * *", "*/10 * * * * *", "0 * * * *"]),
    downtime=st.floats(min_value=0, max_value=3 * 24 * 3600),
)
def test_after_downtime_one_catch_up_run_then_the_next_cron_time_after_now(cron: str, downtime: float) -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron=cron, task=TASK), START)
    due = world.armed()[0].at
    back = due + timedelta(seconds=downtime)  # nothing ran while everything was down
    # The stored timer fires once; its run is recorded when the scheduler is back.
    world.fire_and_run(back)
    assert world.state is not None and world.state.runs == 1
    [upcoming] = world.armed()
    assert upcoming.at > back
    assert upcoming.at == cron_times(cron, "UTC", back, 1)[0]  # the missed times in between are not run


@given(overlap=st.sampled_from(["skip", "allow", "cancel_previous"]), previous_open=st.booleans())
def test_overlap_rules(overlap: str, previous_open: bool) -> None:
    action = overlap_action(overlap, previous_open=previous_open)  # type: ignore[arg-type]
    if not previous_open or overlap == "allow":
        assert action == "submit"
    elif overlap == "skip":
        assert action == "skip"
    else:
        assert action == "cancel_then_submit"


def test_a_skipped_run_keeps_the_previous_task_and_counts_the_skip() -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK), START)
    first = world.fire_and_run(world.armed()[0].at)
    assert world.state is not None
    previous = world.state.last_task_id
    [fired] = world.armed()
    world.run(record(fired, task_id=None, outcome="skipped", reason="open"), fired.at)
    assert world.state.last_task_id == previous
    assert (world.state.runs, world.state.skipped, world.state.last_outcome) == (1, 1, "skipped")
    assert world.state.last_fire_at == fired.at > first
    assert len(world.armed()) == 1  # a skip arms the next fire like any run
    [upcoming] = world.armed()
    with pytest.raises(InvalidCommand):  # a submitting outcome names its task
        SCHEDULE.decide(world.state, record(upcoming, task_id=None), ctx(START))


@given(
    pause_after=st.integers(min_value=0, max_value=3),
    paused_for=st.floats(min_value=1, max_value=7200),
)
def test_pause_stops_fires_and_resume_fires_from_the_next_time_after_it(pause_after: int, paused_for: float) -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK), START)
    for _ in range(pause_after):
        world.fire_and_run(world.armed()[0].at)
    [stale] = world.armed()
    paused_at = stale.at - timedelta(seconds=1)
    world.run(PauseSchedule(schedule_id="s1"), paused_at)
    assert world.armed() == []
    assert world.state is not None and world.state.paused and world.state.next_fire_at is None
    with pytest.raises(FireNotDue):  # a timer the purge missed fires anyway: no run is recorded
        world.run(record(stale, task_id="t-stale"), stale.at)
    resumed_at = paused_at + timedelta(seconds=paused_for)
    world.run(ResumeSchedule(schedule_id="s1"), resumed_at)
    [upcoming] = world.armed()
    assert upcoming.at == cron_times("* * * * *", "UTC", resumed_at, 1)[0]
    assert world.state.runs == pause_after  # nothing ran while paused


def test_a_fire_that_a_pause_got_to_first_records_no_run() -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK), START)
    [fired] = world.armed()  # it fires, and before the scheduler records its run, the schedule is paused
    world.run(PauseSchedule(schedule_id="s1"), fired.at)
    assert not is_due(world.state, fired.generation, fired.at)
    with pytest.raises(FireNotDue, match="no longer waits for its fire"):
        world.run(record(fired, task_id="t1"), fired.at)
    assert world.state is not None and (world.state.last_task_id, world.state.runs, world.armed()) == (None, 0, [])


def test_a_fire_runs_once_however_often_it_is_delivered() -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK), START)
    [fired] = world.armed()
    world.fire_and_run(fired.at)
    with pytest.raises(FireNotDue):
        world.run(record(fired, task_id="t-again"), fired.at + timedelta(seconds=1))
    assert world.state is not None and world.state.runs == 1


def test_a_fire_of_an_earlier_generation_never_fires_into_a_later_one() -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK), START)
    [old] = world.armed()
    world.run(DeleteSchedule(schedule_id="s1"), START)
    assert world.armed() == []
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK), START)
    assert world.state is not None and world.state.generation == 2
    [new] = world.armed()
    assert new.at == old.at and new != old
    assert not is_due(world.state, old.generation, old.at) and is_due(world.state, new.generation, new.at)
    with pytest.raises(FireNotDue):
        world.run(record(old, task_id="t-old"), old.at)
    assert run_task_id("acme", "s1", 1, old.at) != run_task_id("acme", "s1", 2, new.at)


@given(fires=st.integers(min_value=1, max_value=4), pending=st.booleans())
def test_a_log_with_fires_on_the_schedules_subject_folds_as_without_them(fires: int, pending: bool) -> None:
    """Releases before fires moved to their own subject wrote them into the schedule's: those logs
    fold to the same state, and a fire whose run was not yet recorded is still due."""
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK), START)
    legacy = list(world.events)
    for _ in range(fires):
        [fired] = world.armed()
        legacy.append(fired)
        if pending:
            break
        legacy.extend(world.run(record(fired, task_id=f"t-{fired.at.minute}"), fired.at))
    assert SCHEDULE.fold(legacy) == world.state
    [due] = world.armed()
    assert is_due(SCHEDULE.fold(legacy), due.generation, due.at)


def test_a_manual_run_leaves_the_cron_fires_alone() -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="0 * * * *", task=TASK), START)
    armed = world.armed()
    manual = ScheduleFired(at=START, generation=1)
    world.run(record(manual, task_id="manual", manual=True), START)
    assert world.armed() == armed
    assert world.state is not None and (world.state.last_task_id, world.state.runs) == ("manual", 1)


commands = st.one_of(
    st.builds(
        CreateSchedule,
        schedule_id=st.just("s1"),
        cron=st.sampled_from(CRONS),
        timezone=st.sampled_from(ZONES),
        task=st.just(TASK),
        overlap=st.sampled_from(["skip", "allow", "cancel_previous"]),
        paused=st.booleans(),
    ),
    st.builds(PauseSchedule, schedule_id=st.just("s1")),
    st.builds(ResumeSchedule, schedule_id=st.just("s1")),
    st.builds(DeleteSchedule, schedule_id=st.just("s1")),
    st.just("fire"),
    st.just("stale fire"),
)


@given(st.lists(st.tuples(commands, st.floats(min_value=0, max_value=600)), max_size=25))
def test_any_sequence_keeps_one_timer_at_most_and_the_state_is_the_fold(
    steps: list[tuple[object, float]],
) -> None:
    world = World()
    now = START
    for command, wait in steps:
        now += timedelta(seconds=wait)
        if command == "fire":
            armed = world.armed()
            if armed:
                now = max(now, armed[0].at)
                world.fire_and_run(now)
            continue
        if command == "stale fire":  # the newest fire delivered again, or a timer a pause did not purge
            if world.state is not None and world.state.last_fire_at is not None:
                stale = ScheduleFired(at=world.state.last_fire_at, generation=world.state.generation)
                with pytest.raises((FireNotDue, NotFound)):
                    world.run(record(stale, task_id="t-stale"), now)
            continue
        live = world.state is not None and not world.state.deleted
        refusal = (
            (AlreadyExists if live else None) if isinstance(command, CreateSchedule) else (None if live else NotFound)
        )
        if refusal is None:
            world.run(command, now)
        else:
            with pytest.raises(refusal):
                world.run(command, now)
        timers = world.armed()
        assert len(timers) <= 1
        state = world.state
        if state is None or state.deleted or state.paused:
            assert timers == []
        else:
            assert [t.at for t in timers] == [state.next_fire_at]
    assert SCHEDULE.fold(world.events) == world.state


def test_cron_and_time_zone_are_checked_with_reasons() -> None:
    check_cron("*/15 9-17 * * MON-FRI", "Europe/Paris")
    check_cron("*/5 * * * * *", "UTC")
    for cron, zone, says in [
        ("* * * *", "UTC", "has 4 fields"),
        ("61 * * * *", "UTC", "not a valid expression"),
        ("* * * * * * *", "UTC", "has 7 fields"),
        ("0 0 30 2 *", "UTC", "not a valid expression"),
        ("* * * * *", "Mars/Olympus", "not a known IANA time zone"),
        ("* * * * *", "../etc/passwd", "not a known IANA time zone"),
    ]:
        with pytest.raises(InvalidSchedule, match=says):
            check_cron(cron, zone)
    with pytest.raises(InvalidCommand):
        SCHEDULE.decide(None, CreateSchedule(schedule_id="s1", cron="bad", task=TASK), ctx(START))


def test_a_time_zone_with_daylight_saving_fires_at_its_local_time() -> None:
    # Paris moves to summer time on 2026-03-29: 09:00 local is 08:00 UTC before and 07:00 UTC after.
    before = next_fire("0 9 * * *", "Europe/Paris", datetime(2026, 3, 27, 12, tzinfo=UTC))
    after = next_fire("0 9 * * *", "Europe/Paris", datetime(2026, 3, 30, 12, tzinfo=UTC))
    assert (before.hour, after.hour) == (8, 7)


def test_run_task_ids_are_stable_per_fire_and_distinct_across_fires() -> None:
    a = run_task_id("acme", "s1", 1, START)
    assert a == run_task_id("acme", "s1", 1, START.astimezone(ZoneInfo("Asia/Tokyo")))
    assert (
        len({a, run_task_id("acme", "s1", 1, START + timedelta(minutes=1)), run_task_id("globex", "s1", 1, START)}) == 3
    )


def test_state_is_a_plain_struct_that_round_trips() -> None:
    world = World()
    world.run(CreateSchedule(schedule_id="s1", cron="* * * * *", task=TASK, overlap="allow"), START)
    assert isinstance(world.state, Schedule)
    assert world.state.next_fire_at == datetime(2026, 3, 1, 0, 1, tzinfo=UTC)
