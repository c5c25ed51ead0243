"""The shape every aggregate takes: pure ``decide``/``evolve`` plus the timers a state needs.

Timers are derived from state, not emitted by ``decide``: the store arms ``timers(new) - timers(old)``
in the same atomic batch as the events, purges the ones no longer wanted, and a reconciler can re-arm
every timer from state alone after disaster recovery."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import msgspec

from core.domain.commands import Actor, Command
from core.domain.events import Event

S = TypeVar("S")


class DecisionContext(msgspec.Struct, frozen=True):
    org: str
    now: datetime
    actor: Actor


class Timer(msgspec.Struct, frozen=True):
    """Fire ``event`` into the aggregate's subject at ``event.at``. ``key`` names what it guards and is
    unique per guarded thing, so cancelling an old timer can never hit a newer one."""

    key: str
    event: Event
    into: str | None = None
    """Fire into the subject of this aggregate type (same org and id) instead: for a timer whose event
    is work for a process to pick up, not history of the aggregate (a schedule's fire, ADR 0011)."""


@dataclass(frozen=True)
class Decider(Generic[S]):
    aggregate: str
    commands: tuple[type[Command], ...]
    initial: S
    decide: Callable[[S, Command, DecisionContext], Sequence[Event]]
    evolve: Callable[[S, Event], S]
    timers: Callable[[S], Sequence[Timer]]
    aggregate_id: Callable[[Command], str]

    def fold(self, events: Iterable[Event], state: S | None = None) -> S:
        current = self.initial if state is None else state
        for event in events:
            current = self.evolve(current, event)
        return current


def no_timers(state: object) -> Sequence[Timer]:
    """The timers of an aggregate that never wants one."""
    return ()
