"""What a projection is to the projector: a named group of tables, and how a batch of events folds
into them. :class:`StateProjection` folds aggregates with core's own ``evolve``: domain rules are
never repeated here.

A batch loads the current state of the aggregates it touches in one query per table (less those
the projector's cache proves current, ``projections.folds.cache``), folds its events in memory and
writes each touched aggregate back once, with one statement per table or fewer
(``unnest`` arrays, not a round trip per row). That is what makes a rebuild fast, and it makes live
and rebuilt tables equal by construction: both are the same fold of the same log."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, TypeVar

import asyncpg

from core.domain.decider import Decider
from core.domain.records import RecordedEvent
from core.domain.subjects import parse_aggregate_subject
from projections.folds.cache import BatchStates
from projections.folds.tables import AggregateKey, Folded, StateTable

log = logging.getLogger(__name__)

S = TypeVar("S")

address_of = lru_cache(maxsize=16_384)(parse_aggregate_subject)
"""``core.domain.subjects.parse_aggregate_subject``, remembered: every projection of a batch asks for
the address of the same events, and parsing each subject once, not once per projection, keeps a
rebuild's cost per event from growing with the number of projections."""


def fold(
    decider: Decider[S], histories: dict[AggregateKey, list[RecordedEvent]], states: dict[AggregateKey, S]
) -> tuple[dict[AggregateKey, Folded[S]], int]:
    """Fold each aggregate's new events onto its stored state; returns the results and how many events
    could not be folded. ``evolve`` is pure and total for every event it knows, so a failure is a bug
    or a corrupt event: it is logged and skipped rather than wedging the projection forever."""
    folded: dict[AggregateKey, Folded[S]] = {}
    failures = 0
    for key, history in histories.items():
        state = states.get(key, decider.initial)
        for item in history:
            try:
                state = decider.evolve(state, item.event)
            except Exception:
                failures += 1
                kind = type(item.event).__name__
                log.exception("skipping %s at seq %d on %s: it cannot be folded", kind, item.seq, item.subject)
        folded[key] = Folded(state, history[-1].seq)
    return folded, failures


class Projection(ABC):
    """A named group of tables that the projector keeps up to date under one checkpoint."""

    name: str
    tables: tuple[str, ...]
    """Every table it owns, emptied by a rebuild."""

    @abstractmethod
    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], states: BatchStates | None = None
    ) -> int:
        """Fold ``events`` (stream order, all newer than the checkpoint) inside the caller's
        transaction; returns how many were skipped because they could not be folded. ``states``: the
        projector's cache of folded states as this batch sees it (``projections.folds.cache``)."""

    def reads(self, aggregate: str) -> bool:
        """Whether events of ``aggregate`` may change these tables (the projector traces no batch
        holding none of them)."""
        return True


class StateProjection(Projection):
    """Tables holding aggregate states, one :class:`StateTable` per aggregate type."""

    def __init__(self, name: str, tables: tuple[str, ...], states: dict[str, StateTable[Any]]) -> None:
        self.name = name
        self.tables = tables
        self._states = states

    def reads(self, aggregate: str) -> bool:
        return aggregate in self._states

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], states: BatchStates | None = None
    ) -> int:
        histories: dict[str, dict[AggregateKey, list[RecordedEvent]]] = defaultdict(lambda: defaultdict(list))
        for item in events:
            address = address_of(item.subject)
            if address.aggregate in self._states:
                histories[address.aggregate][(address.org, address.id)].append(item)
        failures = 0
        for aggregate, by_key in histories.items():
            table = self._states[aggregate]
            known, unknown = ({}, list(by_key)) if states is None else states.starting_states(table, by_key)
            if unknown:
                known.update(await table.load(conn, unknown))
            folded, failed = fold(table.decider, by_key, known)
            await table.save(conn, folded)
            if states is not None:
                states.folded(table, by_key, folded)
            failures += failed
        return failures
