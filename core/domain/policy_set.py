"""An org's policy bundles, as one aggregate on the log (``cp.<org>.policy.bundles``): every push is a
new version, numbered from 1 in the order the log accepted them. Versions are never edited or removed,
so a task that recorded the version it was submitted under can always find the bundle again, and an
audit can show which rules were in force at any moment."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from core.domain.commands import Command, PushPolicyBundle
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.errors import AlreadyExists
from core.domain.events import Event, PolicyBundlePushed

POLICY_AGGREGATE = "policy"
POLICY_SET_ID = "bundles"


class PolicySet(msgspec.Struct, frozen=True):
    versions: tuple[PolicyBundlePushed, ...] = ()

    @property
    def current(self) -> PolicyBundlePushed | None:
        return self.versions[-1] if self.versions else None

    def version(self, number: int) -> PolicyBundlePushed | None:
        return self.versions[number - 1] if 1 <= number <= len(self.versions) else None


class Unchanged(AlreadyExists):
    """The pushed bundle is the current version already: nothing to record."""

    def __init__(self, current: PolicyBundlePushed) -> None:
        super().__init__(f"this bundle is already the current version {current.version} ({current.digest})")
        self.current = current


def _decide(state: PolicySet, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    assert isinstance(command, PushPolicyBundle)
    if state.current is not None and state.current.digest == command.digest:
        raise Unchanged(state.current)
    return [
        PolicyBundlePushed(
            at=ctx.now,
            version=len(state.versions) + 1,
            digest=command.digest,
            modules=command.modules,
            data=command.data,
            wasm=command.wasm,
            revision=command.revision,
            entrypoints=command.entrypoints,
            pushed_by=ctx.actor.id,
        )
    ]


def _evolve(state: PolicySet, event: Event) -> PolicySet:
    if isinstance(event, PolicyBundlePushed) and event.version == len(state.versions) + 1:
        return PolicySet(versions=(*state.versions, event))
    return state


POLICY_SET = Decider[PolicySet](
    aggregate=POLICY_AGGREGATE,
    commands=(PushPolicyBundle,),
    initial=PolicySet(),
    decide=_decide,
    evolve=_evolve,
    timers=no_timers,
    aggregate_id=lambda command: POLICY_SET_ID,
)
