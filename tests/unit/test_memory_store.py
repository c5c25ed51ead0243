"""The in-memory event store keeps the contract the JetStream store keeps against a real nats-server
(tests/integration/test_event_store.py): optimistic concurrency per subject, message-id deduplication
as the server answers it, one global order, NATS subject filters, and durable timers."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.domain.events import TaskCancelled, TaskLeaseExpired
from core.log.event_store import (
    TIMER_ACTOR,
    AppendMeta,
    DuplicateAppend,
    EventStore,
    Schedule,
    StoreError,
    WrongExpectedSequence,
)
from core.log.memory_store import InMemoryEventStore, subject_matches
from core.log.store import JetStreamEventStore

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
SUBJECT = "cp.acme.task.t1"
OTHER = "cp.acme.task.t2"


def cancelled(reason: str = "one", at: datetime = T0) -> TaskCancelled:
    return TaskCancelled(at=at, by="x", reason=reason)


def meta(command_id: str, at: datetime = T0, **fields: str) -> AppendMeta:
    return AppendMeta(command_id, "alice", at, **fields)


def lease_timer(seconds: float, lease: str = "l1", subject: str = SUBJECT) -> Schedule:
    expiry = TaskLeaseExpired(at=T0 + timedelta(seconds=seconds), lease_id=lease)
    return Schedule(subject=f"cpsched.{subject.removeprefix('cp.')}.lease-{lease}", target=subject, event=expiry)


def test_both_stores_offer_exactly_the_protocol_the_handler_uses() -> None:
    methods = {"append", "read_subject", "cancel_schedules", "holds", "arm"}
    declared = {name for name, _ in inspect.getmembers(EventStore, inspect.isfunction) if not name.startswith("_")}
    assert declared == methods
    for name in methods:
        promised = inspect.signature(getattr(EventStore, name))
        assert inspect.signature(getattr(InMemoryEventStore, name)) == promised, name
        assert inspect.signature(getattr(JetStreamEventStore, name)) == promised, name


async def test_a_batch_with_a_wrong_expected_sequence_stores_nothing() -> None:
    store = InMemoryEventStore()
    events = [cancelled("one"), cancelled("two")]
    with pytest.raises(WrongExpectedSequence):
        await store.append(SUBJECT, events, expected_last_seq=7, meta=meta("c1"))
    assert await store.last_seq() == 0
    assert await store.read_subject(SUBJECT) == []
    assert await store.append(SUBJECT, events, expected_last_seq=0, meta=meta("c2")) == [1, 2]
    with pytest.raises(DuplicateAppend):  # a batch is checked for duplicates first, as nats-server does
        await store.append(SUBJECT, events, expected_last_seq=0, meta=meta("c2"))
    assert [r.seq for r in await store.read_subject(SUBJECT)] == [1, 2]


async def test_a_single_event_is_checked_for_concurrency_before_duplicates() -> None:
    """What nats-server answers (probed on v2.15): a stale re-append is a lost race, a current one a
    duplicate; either way nothing more is stored and the handler reloads and finds the outcome."""
    store = InMemoryEventStore()
    await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"))
    with pytest.raises(WrongExpectedSequence):
        await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"))
    with pytest.raises(DuplicateAppend):
        await store.append(SUBJECT, [cancelled()], expected_last_seq=1, meta=meta("c1"))
    with pytest.raises(DuplicateAppend):  # message ids are unique across the whole log
        await store.append(OTHER, [cancelled()], expected_last_seq=0, meta=meta("c1"))
    assert await store.last_seq() == 1


async def test_a_batch_sharing_one_message_id_with_the_log_is_a_duplicate() -> None:
    store = InMemoryEventStore()
    await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"))
    with pytest.raises(DuplicateAppend):  # c1:0 is stored, c1:1 is not: the batch is refused whole
        await store.append(SUBJECT, [cancelled(), cancelled("two")], expected_last_seq=1, meta=meta("c1"))
    assert [r.seq for r in await store.read_subject(SUBJECT)] == [1]


async def test_a_message_id_is_a_duplicate_only_within_the_window() -> None:
    store = InMemoryEventStore(duplicate_window=timedelta(seconds=120))
    await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"))
    with pytest.raises(DuplicateAppend):
        await store.append(OTHER, [cancelled()], expected_last_seq=0, meta=meta("c1", T0 + timedelta(seconds=119)))
    assert await store.append(
        OTHER, [cancelled()], expected_last_seq=0, meta=meta("c1", T0 + timedelta(minutes=2))
    ) == [2]


async def test_sequences_are_global_consecutive_per_command_and_read_in_order() -> None:
    store = InMemoryEventStore()
    assert await store.append(SUBJECT, [cancelled("a")], expected_last_seq=0, meta=meta("c1")) == [1]
    assert await store.append(OTHER, [cancelled("b"), cancelled("c")], expected_last_seq=0, meta=meta("c2")) == [2, 3]
    assert await store.append(SUBJECT, [cancelled("d")], expected_last_seq=1, meta=meta("c3")) == [4]
    assert [r.event.reason for r in await store.read_subject("cp.acme.>")] == ["a", "b", "c", "d"]
    assert [r.seq for r in await store.read_subject(SUBJECT)] == [1, 4]
    assert [r.seq for r in await store.read_subject(SUBJECT, after_seq=1)] == [4]
    with pytest.raises(WrongExpectedSequence):  # the subject's last is 4, not the log's 3 of another subject
        await store.append(SUBJECT, [cancelled()], expected_last_seq=3, meta=meta("c4"))


async def test_a_recorded_event_carries_what_the_log_gives_back() -> None:
    store = InMemoryEventStore()
    await store.append(
        SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1", correlation_id="req-1", causation_id="")
    )
    [recorded] = await store.read_subject(SUBJECT)
    assert recorded.command_id == "c1"
    assert recorded.actor == "alice"
    assert recorded.correlation_id == "req-1"
    assert recorded.causation_id is None  # an empty header is no header
    assert recorded.recorded_at == T0.replace(microsecond=123000)  # Cp-Time keeps milliseconds
    assert recorded.event == cancelled()


@given(
    pattern=st.lists(st.sampled_from(["cp", "acme", "task", "t1", "*", ">"]), min_size=1, max_size=5),
    subject=st.lists(st.sampled_from(["cp", "acme", "task", "t1"]), min_size=1, max_size=5),
)
def test_subject_filters_match_as_nats_matches_them(pattern: list[str], subject: list[str]) -> None:
    if ">" in pattern[:-1]:
        with pytest.raises(StoreError):
            subject_matches(".".join(pattern), ".".join(subject))
        return

    def token_matches(want: str, token: str) -> bool:
        return want in ("*", token)

    if pattern[-1] == ">":
        expected = len(subject) >= len(pattern) and all(map(token_matches, pattern[:-1], subject))
    else:
        expected = len(subject) == len(pattern) and all(map(token_matches, pattern, subject))
    assert subject_matches(".".join(pattern), ".".join(subject)) == expected


async def test_wildcard_reads_see_an_org_and_nothing_of_another() -> None:
    store = InMemoryEventStore()
    await store.append("cp.acme.task.t1", [cancelled("a")], expected_last_seq=0, meta=meta("c1"))
    await store.append("cp.acme.worker.w1", [cancelled("b")], expected_last_seq=0, meta=meta("c2"))
    await store.append("cp.other.task.t1", [cancelled("c")], expected_last_seq=0, meta=meta("c3"))
    assert [r.event.reason for r in await store.read_subject("cp.acme.>")] == ["a", "b"]
    assert [r.event.reason for r in await store.read_subject("cp.*.task.*")] == ["a", "c"]
    assert await store.read_subject("cp.acme") == []  # `>` needs at least one more token
    assert not await store.holds("cp.nobody.>")


async def test_a_subject_outside_the_stream_is_refused() -> None:
    store = InMemoryEventStore()
    with pytest.raises(StoreError, match="no stream"):
        await store.append("elsewhere.acme", [cancelled()], expected_last_seq=0, meta=meta("c1"))
    with pytest.raises(StoreError, match="no stream"):
        await store.append(
            SUBJECT,
            [cancelled()],
            expected_last_seq=0,
            meta=meta("c1"),
            schedules=[Schedule("nowhere.t1", SUBJECT, cancelled())],
        )
    assert await store.last_seq() == 0


async def test_an_armed_timer_fires_into_its_target_as_the_timer_actor_and_is_gone() -> None:
    store = InMemoryEventStore()
    timer = lease_timer(30)
    seqs = await store.append(
        SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1", correlation_id="req-1"), schedules=[timer]
    )
    assert seqs == [2]  # the definition took sequence 1, as the adapter publishes it first
    assert await store.holds(timer.subject)
    assert [r.seq for r in await store.read_subject(SUBJECT)] == [2]
    assert [r.seq for r in await store.read_subject("cpsched.>")] == [1]
    assert store.fire_due(T0 + timedelta(seconds=29)) == []
    assert store.fire_due(T0 + timedelta(seconds=30)) == [3]
    assert not await store.holds(timer.subject)
    fired = (await store.read_subject(SUBJECT))[-1]
    assert fired.event == timer.event
    assert (fired.actor, fired.command_id, fired.causation_id, fired.correlation_id) == (
        TIMER_ACTOR,
        None,
        "c1",
        "req-1",
    )
    assert fired.recorded_at == timer.event.at.replace(microsecond=123000)
    assert store.fire_due(T0 + timedelta(hours=1)) == []  # a timer fires once


async def test_due_timers_fire_earliest_first() -> None:
    store = InMemoryEventStore()
    await store.arm([lease_timer(20, "late"), lease_timer(10, "early", OTHER)], meta("arm"))
    assert store.fire_due(T0 + timedelta(minutes=1)) == [3, 4]
    assert [r.subject for r in await store.read_subject("cp.>")] == [OTHER, SUBJECT]


async def test_cancelling_removes_only_definitions_older_than_the_sequence() -> None:
    store = InMemoryEventStore()
    timer = lease_timer(30)
    await store.arm([timer], meta("first"))  # seq 1
    await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"))  # seq 2
    await store.arm([timer], meta("re-armed"))  # seq 3: a newer re-arm of the same timer
    await store.cancel_schedules([timer.subject], older_than_seq=3)
    assert [r.causation_id for r in await store.read_subject(timer.subject)] == ["re-armed"]
    assert store.fire_due(T0 + timedelta(minutes=1)) == [4]  # only the survivor fires
    await store.cancel_schedules([timer.subject], older_than_seq=10)
    assert await store.read_subject(SUBJECT) != []  # a purge touches only its own subject


async def test_a_refused_append_disarms_the_timers_it_armed() -> None:
    store = InMemoryEventStore()
    await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"))
    with pytest.raises(WrongExpectedSequence):
        await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c2"), schedules=[lease_timer(5)])
    assert not await store.holds("cpsched.>")
    assert store.fire_due(T0 + timedelta(minutes=1)) == []


async def test_an_injected_failure_stores_nothing_or_loses_only_the_acknowledgement() -> None:
    store = InMemoryEventStore()
    store.fail_next_append(StoreError("unreachable"))
    with pytest.raises(StoreError, match="unreachable"):
        await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"), schedules=[lease_timer(5)])
    assert await store.last_seq() == 0
    store.fail_next_append(StoreError("ack lost"), after_storing=True)
    with pytest.raises(StoreError, match="ack lost"):
        await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"), schedules=[lease_timer(5)])
    assert [r.command_id for r in await store.read_subject(SUBJECT)] == ["c1"]
    assert not await store.holds("cpsched.>")  # the adapter cannot tell a lost ack from a refusal: it disarms
    with pytest.raises(DuplicateAppend):
        await store.append(SUBJECT, [cancelled()], expected_last_seq=2, meta=meta("c1"))


async def test_a_lost_acknowledgement_waits_for_an_append_the_log_accepts() -> None:
    store = InMemoryEventStore()
    store.fail_next_append(StoreError("ack lost"), after_storing=True)
    with pytest.raises(WrongExpectedSequence):  # a stale attempt is refused as usual and stores nothing
        await store.append(SUBJECT, [cancelled()], expected_last_seq=5, meta=meta("c1"))
    with pytest.raises(StoreError, match="ack lost"):
        await store.append(SUBJECT, [cancelled()], expected_last_seq=0, meta=meta("c1"))
    assert await store.append(OTHER, [cancelled()], expected_last_seq=0, meta=meta("c2")) == [2]


async def test_a_hook_appends_a_competitor_just_before_the_append_is_checked() -> None:
    store = InMemoryEventStore()

    async def competitor(subject: str) -> None:
        last = (await store.read_subject(subject))[-1].seq if await store.holds(subject) else 0
        await store.append(subject, [cancelled("competitor")], expected_last_seq=last, meta=meta(f"rival-{last}"))

    store.before_next_append(competitor, times=2)
    for _ in range(2):
        with pytest.raises(WrongExpectedSequence):
            await store.append(SUBJECT, [cancelled("mine")], expected_last_seq=0, meta=meta("mine"))
    assert await store.append(SUBJECT, [cancelled("mine")], expected_last_seq=2, meta=meta("mine")) == [3]
    assert [r.event.reason for r in await store.read_subject(SUBJECT)] == ["competitor", "competitor", "mine"]
    assert store.appends_tried == 3  # the competitor's appends are not counted


@settings(max_examples=100, deadline=None)
@given(writes=st.lists(st.tuples(st.sampled_from([SUBJECT, OTHER]), st.integers(1, 3), st.booleans()), max_size=12))
async def test_occ_accepts_exactly_the_appends_that_know_the_subjects_last_sequence(
    writes: list[tuple[str, int, bool]],
) -> None:
    store = InMemoryEventStore()
    last: dict[str, int] = {}
    for number, (subject, count, stale) in enumerate(writes):
        expected = last.get(subject, 0) + (1 if stale else 0)
        events = [cancelled(str(i)) for i in range(count)]
        if stale:
            with pytest.raises(WrongExpectedSequence):
                await store.append(subject, events, expected_last_seq=expected, meta=meta(f"c{number}"))
            continue
        seqs = await store.append(subject, events, expected_last_seq=expected, meta=meta(f"c{number}"))
        assert seqs == list(range(seqs[0], seqs[0] + count))
        assert seqs[0] == await store.last_seq() - count + 1
        last[subject] = seqs[-1]
    for subject, seq in last.items():
        assert (await store.read_subject(subject))[-1].seq == seq
