"""An org's worker configuration, as one aggregate on the log (``cp.<org>.workerconfig.all``).

What a worker is told when it registers: how often to report liveness, how long its leases last, and
how its workflows call models (the LLM gateway's ``api_base``, a model that overrides the workflow's,
fallbacks). The org sets a configuration and each environment may set one of its own; a worker gets
the org's, overridden field by field by its queue's environment's. So a runner needs only the gateway
URL and a worker key: everything else comes from here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import msgspec

from core.domain.commands import Command, LlmConfig, SetWorkerConfig
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.events import Event, LlmSettings, WorkerConfigSet

WORKER_CONFIG_AGGREGATE = "workerconfig"
WORKER_CONFIG_ID = "all"
T = TypeVar("T")


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One scope's configuration (the org's, or an environment's); a None field sets nothing."""

    heartbeat_interval_seconds: float | None = None
    lease_seconds: float | None = None
    llm: LlmSettings = LlmSettings()

    def over(self, base: WorkerConfig) -> WorkerConfig:
        """This configuration where it sets a field, ``base`` where it does not (LLM settings field by field)."""
        return WorkerConfig(
            heartbeat_interval_seconds=_first(self.heartbeat_interval_seconds, base.heartbeat_interval_seconds),
            lease_seconds=_first(self.lease_seconds, base.lease_seconds),
            llm=LlmSettings(
                api_base=_first(self.llm.api_base, base.llm.api_base),
                model_override=_first(self.llm.model_override, base.llm.model_override),
                fallbacks=_first(self.llm.fallbacks, base.llm.fallbacks),
            ),
        )


UNSET = WorkerConfig()


def _first(preferred: T | None, fallback: T | None) -> T | None:
    return fallback if preferred is None else preferred


class WorkerConfigs(msgspec.Struct, frozen=True):
    """The org's configuration and each environment's, as last set (absent: never set)."""

    org: WorkerConfig = UNSET
    by_environment: dict[str, WorkerConfig] = {}

    def scope(self, environment: str | None) -> WorkerConfig:
        """What was set for ``environment`` (None: the org) itself, without inheritance."""
        return self.org if environment is None else self.by_environment.get(environment, UNSET)

    def effective(self, environment: str | None) -> WorkerConfig:
        """What applies to a worker whose queue is in ``environment`` (None: in none)."""
        return self.scope(environment).over(self.org) if environment is not None else self.org


def _decide(state: WorkerConfigs, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    match command:
        case SetWorkerConfig():
            return [
                WorkerConfigSet(
                    at=ctx.now,
                    environment=command.environment,
                    heartbeat_interval_seconds=command.heartbeat_interval_seconds,
                    lease_seconds=command.lease_seconds,
                    llm=_settings(command.llm),
                    set_by=ctx.actor.id,
                )
            ]
    raise TypeError(f"worker configuration aggregate does not handle {type(command).__name__}")


def _settings(llm: LlmConfig) -> LlmSettings:
    return LlmSettings(api_base=llm.api_base, model_override=llm.model_override, fallbacks=llm.fallbacks)


def _evolve(state: WorkerConfigs, event: Event) -> WorkerConfigs:
    match event:
        case WorkerConfigSet():
            config = WorkerConfig(
                heartbeat_interval_seconds=event.heartbeat_interval_seconds,
                lease_seconds=event.lease_seconds,
                llm=event.llm,
            )
            if event.environment is None:
                return WorkerConfigs(org=config, by_environment=state.by_environment)
            return WorkerConfigs(org=state.org, by_environment={**state.by_environment, event.environment: config})
    return state


WORKER_CONFIG = Decider[WorkerConfigs](
    aggregate=WORKER_CONFIG_AGGREGATE,
    commands=(SetWorkerConfig,),
    initial=WorkerConfigs(),
    decide=_decide,
    evolve=_evolve,
    timers=no_timers,
    aggregate_id=lambda command: WORKER_CONFIG_ID,
)
