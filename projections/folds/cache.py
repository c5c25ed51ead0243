"""The states a projector folded and committed, kept in memory so that the next batches need not
SELECT and decode them again: under a steady load a batch touches the aggregates the batches just
before it folded, and loading them back cost a statement per table per batch.

Trusted per aggregate by the log itself, never by assumption about who else writes the tables. The
first event of a command carries ``Nats-Expected-Last-Subject-Sequence``, the sequence of its
subject's previous event (the server stores the event only if that is so). A kept state folded up to
exactly that sequence is therefore the state the aggregate's row holds, since rows and checkpoints
commit together and exactly once; and 0 says the aggregate had no event before, so it starts from
the initial state and there is nothing to load, kept or not. Every other aggregate is loaded as
before: one whose first event in the batch carries no such header (a fired timer, the rest of a
command the fetch cut off), one not kept, or one kept at another sequence (evicted, a batch rolled
back and folded again in pieces, an event PostgreSQL refused).

Only tables that store each state whole (:class:`JsonStateTable`) are kept: their load decodes what
the fold saved, up to how jsonb spells numbers and orders keys, which no fold reads. A state that
folded an event holding a NUL is not kept, because its row holds a stand-in instead
(``rows.NUL_STAND_IN``) and a fold resumes from the row, as a rebuild does. A batch's states join the
cache only once its transaction has committed. A projector makes a cache per leadership
(``Projector._follow``), so it is dropped whenever the writer locks are lost or taken again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nats.aio.msg import Msg

from core.domain.records import RecordedEvent
from core.lru import Lru
from projections.folds.rows import NUL_ESCAPE
from projections.folds.tables import AggregateKey, Folded, StateTable

KEPT_PER_TABLE = 4096
"""Aggregates kept per table, the most recently folded: as many as the command handler keeps."""
H_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_NUL_ESCAPE = NUL_ESCAPE.encode()


class StateCache:
    def __init__(self, size: int = KEPT_PER_TABLE) -> None:
        self._size = size
        self._kept: dict[StateTable[Any], Lru[AggregateKey, Folded[Any]]] = {}

    def batch(self, msgs: Sequence[Msg]) -> BatchStates:
        """What the batch of ``msgs`` may take from the cache, and what it folds until it commits."""
        previous: dict[int, int] = {}
        with_nul: set[int] = set()
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            expected = msg.headers.get(H_EXPECTED_LAST_SUBJECT_SEQ) if msg.headers else None
            if expected is not None and expected.isdigit():
                previous[seq] = int(expected)
            if _NUL_ESCAPE in msg.data:  # as loose as rows.storable_json: at worst a state is not kept
                with_nul.add(seq)
        return BatchStates(self, previous, with_nul)

    def keep(self, batch: BatchStates) -> None:
        """Keep what ``batch`` folded: call once its transaction has committed."""
        for table, folded in batch.pending:
            kept = self._kept.get(table)
            if kept is None:
                kept = self._kept[table] = Lru(self._size)
            for key, item in folded.items():
                kept.put(key, item)

    def kept(self, table: StateTable[Any]) -> Lru[AggregateKey, Folded[Any]] | None:
        return self._kept.get(table)


class BatchStates:
    """One batch's view of a :class:`StateCache`."""

    def __init__(self, cache: StateCache, previous: Mapping[int, int], with_nul: set[int]) -> None:
        """``previous``: for each event of the batch that says so, the sequence of its subject's
        previous event; ``with_nul``: the events whose data may hold a NUL."""
        self._cache = cache
        self._previous = previous
        self._with_nul = with_nul
        self.pending: list[tuple[StateTable[Any], dict[AggregateKey, Folded[Any]]]] = []
        """What the batch folded, for :meth:`StateCache.keep`."""

    def starting_states(
        self, table: StateTable[Any], histories: Mapping[AggregateKey, list[RecordedEvent]]
    ) -> tuple[dict[AggregateKey, Any], list[AggregateKey]]:
        """The states the aggregates of ``histories`` start from that need no loading (one starting
        from the initial state is left out, as a load leaves out a missing row), and the keys of the
        others, to load."""
        kept = self._cache.kept(table)
        known: dict[AggregateKey, Any] = {}
        unknown: list[AggregateKey] = []
        for key, history in histories.items():
            previous = self._previous.get(history[0].seq)
            if previous == 0:
                continue
            item = kept.get(key) if kept is not None and previous is not None else None
            if item is None or item.seq != previous:
                unknown.append(key)
            elif item.state is not None:  # None: the aggregate has no row, and a fold starts over
                known[key] = item.state
        return known, unknown

    def folded(
        self,
        table: StateTable[Any],
        histories: Mapping[AggregateKey, list[RecordedEvent]],
        folded: dict[AggregateKey, Folded[Any]],
    ) -> None:
        """What the batch folded into ``table`` from ``histories``, to keep once committed."""
        if not table.stored_whole:
            return
        if self._with_nul:
            folded = {
                key: item
                for key, item in folded.items()
                if not any(event.seq in self._with_nul for event in histories[key])
            }
        self.pending.append((table, folded))
