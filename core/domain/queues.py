"""An org's queue settings, as one aggregate on the log (``cp.<org>.queues.all``). Pure: no I/O, no clock.

A queue needs no creating: submitting to it is enough. Settings are for the queues whose workers
should be treated otherwise than by default:

- ``strategy``: which of the workers waiting on the queue gets a task that opens up (``fifo``, the one
  waiting longest; ``least_loaded``, the one holding the fewest leases; ``round_robin``, the next worker
  id after the one served last; ``random``);
- the circuit breaker: how many consecutive failed attempts open a worker's breaker, and for how long.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from core.domain.commands import (
    DEFAULT_BREAKER_COOLDOWN_SECONDS,
    DEFAULT_BREAKER_FAILURES,
    Command,
    ConfigureQueue,
    RemoveQueueSettings,
)
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.errors import NotFound, Rejected
from core.domain.events import ClaimStrategy, Event, QueueConfigured, QueueSettingsRemoved

QUEUES_AGGREGATE = "queues"
QUEUES_ID = "all"
MAX_CONFIGURED_QUEUES = 1000
"""Per org: the settings are one aggregate, read when workers wait and when attempts are recorded."""


class QueueSettings(msgspec.Struct, frozen=True):
    queue: str
    strategy: ClaimStrategy = "fifo"
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_cooldown_seconds: float = DEFAULT_BREAKER_COOLDOWN_SECONDS
    configured: bool = False
    """False: nobody set anything, these are the defaults."""
    updated_at: datetime | None = None
    configured_by: str | None = None


class Queues(msgspec.Struct, frozen=True):
    by_name: dict[str, QueueSettings] = {}

    def of(self, queue: str) -> QueueSettings:
        """The queue's settings: the configured ones, else the defaults."""
        return self.by_name.get(queue) or QueueSettings(queue=queue)

    def listed(self) -> list[QueueSettings]:
        """Every configured queue, by name."""
        return [self.by_name[name] for name in sorted(self.by_name)]


class TooManyQueues(Rejected):
    pass


def _decide(state: Queues, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    match command:
        case ConfigureQueue():
            if command.queue not in state.by_name and len(state.by_name) >= MAX_CONFIGURED_QUEUES:
                raise TooManyQueues(
                    f"this org has settings for {MAX_CONFIGURED_QUEUES} queues, the most it may have; "
                    "remove the settings of one first"
                )
            return [
                QueueConfigured(
                    at=ctx.now,
                    queue=command.queue,
                    strategy=command.strategy,  # type: ignore[arg-type]
                    breaker_failures=command.breaker_failures,
                    breaker_cooldown_seconds=command.breaker_cooldown_seconds,
                    configured_by=ctx.actor.id,
                )
            ]
        case RemoveQueueSettings():
            if command.queue not in state.by_name:
                raise NotFound(f"queue {command.queue} has no settings of its own")
            return [QueueSettingsRemoved(at=ctx.now, queue=command.queue, removed_by=ctx.actor.id)]
    raise TypeError(f"queues aggregate does not handle {type(command).__name__}")


def _evolve(state: Queues, event: Event) -> Queues:
    match event:
        case QueueConfigured():
            settings = QueueSettings(
                queue=event.queue,
                strategy=event.strategy,
                breaker_failures=event.breaker_failures,
                breaker_cooldown_seconds=event.breaker_cooldown_seconds,
                configured=True,
                updated_at=event.at,
                configured_by=event.configured_by,
            )
            return Queues(by_name={**state.by_name, event.queue: settings})
        case QueueSettingsRemoved() if event.queue in state.by_name:
            return Queues(by_name={name: kept for name, kept in state.by_name.items() if name != event.queue})
    return state


QUEUES = Decider[Queues](
    aggregate=QUEUES_AGGREGATE,
    commands=(ConfigureQueue, RemoveQueueSettings),
    initial=Queues(),
    decide=_decide,
    evolve=_evolve,
    timers=no_timers,
    aggregate_id=lambda command: QUEUES_ID,
)
