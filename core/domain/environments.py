"""An org's environments (prod, staging, …), as one aggregate on the log (``cp.<org>.environments.all``).

An environment names the queues it holds, and a queue belongs to at most one environment of its org:
that rule spans environments, so the org's environments are one consistency boundary, decided with
optimistic concurrency like any aggregate. A task's environment is its queue's, looked up by the
server at submit and recorded with the task; the submitter never declares it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from core.domain.commands import Command, DefineEnvironment, DeleteEnvironment
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.errors import AlreadyExists, InvalidCommand, NotFound, Rejected
from core.domain.events import EnvironmentDefined, EnvironmentDeleted, Event

ENVIRONMENTS_AGGREGATE = "environments"
ENVIRONMENTS_ID = "all"
MAX_ENVIRONMENTS = 100
"""Per org: the whole map is one aggregate, read at every submit, so it stays small."""


class Environment(msgspec.Struct, frozen=True):
    name: str
    queues: tuple[str, ...]
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    defined_by: str


class Environments(msgspec.Struct, frozen=True):
    """The org's environments by name, and which environment holds each queue."""

    by_name: dict[str, Environment] = {}

    def get(self, name: str) -> Environment | None:
        return self.by_name.get(name)

    def of_queue(self, queue: str) -> Environment | None:
        """The environment holding ``queue``, if one does."""
        return next((env for env in self.by_name.values() if queue in env.queues), None)

    def listed(self) -> list[Environment]:
        """Every environment, by name."""
        return [self.by_name[name] for name in sorted(self.by_name)]


class QueueTaken(Rejected):
    """A queue named for one environment already belongs to another."""


class TooManyEnvironments(Rejected):
    pass


def _decide(state: Environments, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    match command:
        case DefineEnvironment():
            existing = state.get(command.name)
            if existing is not None and not command.replace:
                raise AlreadyExists(f"environment {command.name} already exists; replace it to change its queues")
            if existing is None and len(state.by_name) >= MAX_ENVIRONMENTS:
                raise TooManyEnvironments(
                    f"this org has {MAX_ENVIRONMENTS} environments, the most it may have; delete one first"
                )
            seen: set[str] = set()
            for queue in command.queues:
                if queue in seen:
                    raise InvalidCommand(f"queue {queue} is listed twice; list each queue once")
                seen.add(queue)
                holder = state.of_queue(queue)
                if holder is not None and holder.name != command.name:
                    raise QueueTaken(
                        f"queue {queue} belongs to environment {holder.name}: a queue belongs to at most one "
                        f"environment; take it out of {holder.name} first"
                    )
            return [
                EnvironmentDefined(
                    at=ctx.now,
                    name=command.name,
                    queues=command.queues,
                    labels=dict(command.labels),
                    defined_by=ctx.actor.id,
                )
            ]
        case DeleteEnvironment():
            if state.get(command.name) is None:
                raise NotFound(f"environment {command.name} not found")
            return [EnvironmentDeleted(at=ctx.now, name=command.name, deleted_by=ctx.actor.id)]
    raise TypeError(f"environments aggregate does not handle {type(command).__name__}")


def _evolve(state: Environments, event: Event) -> Environments:
    match event:
        case EnvironmentDefined():
            before = state.get(event.name)
            defined = Environment(
                name=event.name,
                queues=event.queues,
                labels=event.labels,
                created_at=event.at if before is None else before.created_at,
                updated_at=event.at,
                defined_by=event.defined_by,
            )
            return Environments(by_name={**state.by_name, event.name: defined})
        case EnvironmentDeleted() if event.name in state.by_name:
            return Environments(by_name={name: env for name, env in state.by_name.items() if name != event.name})
    return state


ENVIRONMENTS = Decider[Environments](
    aggregate=ENVIRONMENTS_AGGREGATE,
    commands=(DefineEnvironment, DeleteEnvironment),
    initial=Environments(),
    decide=_decide,
    evolve=_evolve,
    timers=no_timers,
    aggregate_id=lambda command: ENVIRONMENTS_ID,
)
