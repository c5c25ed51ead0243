"""The projector's cache of folded states (projections.folds.cache): a kept state stands for its row
only when the log proves it current, and only once its batch has committed."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.msg import Msg

from core.domain.events import TaskCancelled, encode_event
from core.domain.records import RecordedEvent
from projections.folds.cache import H_EXPECTED_LAST_SUBJECT_SEQ, StateCache
from projections.folds.queues import QueueSettingsTable
from projections.folds.tables import Folded
from projections.folds.tasks import TaskTable

AT = datetime(2026, 1, 1, tzinfo=UTC)
TASKS = TaskTable()


def message(seq: int, task: str, previous: int | None = None, reason: str = "done") -> Msg:
    """A delivered event of task ``task`` at stream sequence ``seq``, saying its subject's previous
    event was ``previous`` (the header the command handler's first event of a command carries)."""
    headers = {} if previous is None else {H_EXPECTED_LAST_SUBJECT_SEQ: str(previous)}
    return Msg(
        _client=None,
        subject=f"cp.acme.task.{task}",
        reply=f"$JS.ACK.CP_EVENTS.proj-all.1.{seq}.{seq}.1767225600000000000.0",
        data=encode_event(TaskCancelled(at=AT, by="someone", reason=reason)),
        headers=headers,
    )


def history(*msgs: Msg) -> list[RecordedEvent]:
    return [
        RecordedEvent(
            seq=msg.metadata.sequence.stream,
            subject=msg.subject,
            event=TaskCancelled(at=AT, by="x", reason=None),
            recorded_at=AT,
        )
        for msg in msgs
    ]


def cache_holding(folded: dict[tuple[str, str], Folded[object]]) -> StateCache:
    cache = StateCache()
    batch = cache.batch([])
    batch.folded(TASKS, {key: [] for key in folded}, folded)
    cache.keep(batch)
    return cache


def test_a_kept_state_stands_for_its_row_only_at_the_sequence_the_next_event_names() -> None:
    cache = cache_holding({("acme", "t1"): Folded("t1 at 5", 5), ("acme", "t2"): Folded("t2 at 6", 6)})
    new, current, stale, unsaid = message(10, "t0", 0), message(11, "t1", 5), message(12, "t2", 7), message(13, "t3")
    histories = {
        ("acme", "t0"): history(new),
        ("acme", "t1"): history(current),
        ("acme", "t2"): history(stale),
        ("acme", "t3"): history(unsaid),
    }
    known, unknown = cache.batch([new, current, stale, unsaid]).starting_states(TASKS, histories)
    assert known == {("acme", "t1"): "t1 at 5"}  # t0 had no event before: it starts from the initial state
    assert unknown == [("acme", "t2"), ("acme", "t3")]  # kept at another sequence; no header: loaded


def test_a_kept_state_is_not_trusted_for_a_message_without_the_header() -> None:
    cache = cache_holding({("acme", "t1"): Folded("t1 at 5", 5)})
    timer_fired = message(6, "t1")  # a fired timer names no previous event
    known, unknown = cache.batch([timer_fired]).starting_states(TASKS, {("acme", "t1"): history(timer_fired)})
    assert (known, unknown) == ({}, [("acme", "t1")])


def test_an_aggregate_kept_as_gone_starts_over_as_a_load_of_its_missing_row_would() -> None:
    cache = cache_holding({("acme", "t1"): Folded(None, 5)})
    msg = message(6, "t1", 5)
    assert cache.batch([msg]).starting_states(TASKS, {("acme", "t1"): history(msg)}) == ({}, [])


def test_states_are_kept_only_once_their_batch_is_kept() -> None:
    cache = StateCache()
    first = message(1, "t1", 0)
    batch = cache.batch([first])
    batch.folded(TASKS, {("acme", "t1"): history(first)}, {("acme", "t1"): Folded("t1 at 1", 1)})
    following = message(2, "t1", 1)
    histories = {("acme", "t1"): history(following)}
    assert cache.batch([following]).starting_states(TASKS, histories) == ({}, [("acme", "t1")])  # not committed
    cache.keep(batch)
    assert cache.batch([following]).starting_states(TASKS, histories) == ({("acme", "t1"): "t1 at 1"}, [])


def test_a_state_that_folded_a_nul_is_not_kept_because_its_row_holds_a_stand_in() -> None:
    cache = StateCache()
    with_nul, plain = message(1, "t1", 0, reason="a\x00b"), message(2, "t2", 0)
    batch = cache.batch([with_nul, plain])
    histories = {("acme", "t1"): history(with_nul), ("acme", "t2"): history(plain)}
    batch.folded(TASKS, histories, {("acme", "t1"): Folded("t1", 1), ("acme", "t2"): Folded("t2", 2)})
    cache.keep(batch)
    kept = cache.kept(TASKS)
    assert kept is not None and ("acme", "t1") not in kept and ("acme", "t2") in kept


def test_tables_that_do_not_store_a_state_whole_are_never_kept() -> None:
    cache = StateCache()
    table = QueueSettingsTable()
    msg = message(1, "all", 0)
    batch = cache.batch([msg])
    batch.folded(table, {("acme", "all"): history(msg)}, {("acme", "all"): Folded("queues", 1)})
    cache.keep(batch)
    assert cache.kept(table) is None
