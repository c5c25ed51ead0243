"""An org's secrets, as one aggregate on the log (``cp.<org>.secrets.all``): names, versions and their
sealed values, never a value in clear.

An admin sets a secret org-wide or for one environment; each set is a new version of the name
(numbered 1, 2, … per name, across scopes), so rotating is setting again. The value is sealed by the
gateway before the command is issued (envelope encryption, ``core/secret_box.py``): the decider
keeps ciphertext in order and never sees a value. A worker reads through the task it holds (the
``ReadSecret`` command of the task aggregate): the task's environment picks the scope (an
environment's own version wins over the org-wide one), and the task's first read of a name pins the
version it got, until the task ends. A master key rotation re-wraps each version's data key under the
new key (``RewrapSecret``): the ciphertext stays, and the old key is no longer needed to read it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from core.domain.commands import Command, RewrapSecret, SetSecret
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.errors import NotFound, Rejected
from core.domain.events import Event, SecretVersionRewrapped, SecretVersionSet

SECRETS_AGGREGATE = "secrets"
SECRETS_ID = "all"
MAX_SECRET_NAMES = 1000
"""Per org: the whole set is one aggregate, read at every secret read, so it stays bounded."""


class SealedVersion(msgspec.Struct, frozen=True, kw_only=True):
    """One version of a secret as the log holds it: ciphertext, and who set it when."""

    name: str
    version: int
    environment: str | None
    key_id: str
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes
    set_at: datetime
    set_by: str


class SecretScope(msgspec.Struct, frozen=True, kw_only=True):
    """What a listing shows of a name in one scope: its versions, never a value."""

    name: str
    environment: str | None
    version: int
    """The newest: what a task that has not read the name yet gets."""
    versions: tuple[int, ...]
    created_at: datetime
    updated_at: datetime
    set_by: str


class Secrets(msgspec.Struct, frozen=True):
    """Every version of every secret of the org, by name, oldest first."""

    by_name: dict[str, tuple[SealedVersion, ...]] = {}

    def next_version(self, name: str) -> int:
        versions = self.by_name.get(name, ())
        return versions[-1].version + 1 if versions else 1

    def version(self, name: str, version: int) -> SealedVersion | None:
        return next((found for found in self.by_name.get(name, ()) if found.version == version), None)

    def newest(self, name: str, environment: str | None) -> SealedVersion | None:
        """The version a task in ``environment`` (None: in none) reads, unless pinned: the newest set
        for that environment, else the newest org-wide one. Another environment's never applies."""
        versions = self.by_name.get(name, ())
        scoped = [found for found in versions if environment is not None and found.environment == environment]
        org_wide = [found for found in versions if found.environment is None]
        return (scoped or org_wide or [None])[-1]

    def listed(self) -> list[SecretScope]:
        """Each name in each scope it was set in, by name, the org-wide scope first."""
        scopes: list[SecretScope] = []
        for name in sorted(self.by_name):
            environments = sorted({found.environment or "" for found in self.by_name[name]})
            for environment in environments:
                versions = [found for found in self.by_name[name] if (found.environment or "") == environment]
                scopes.append(
                    SecretScope(
                        name=name,
                        environment=environment or None,
                        version=versions[-1].version,
                        versions=tuple(found.version for found in versions),
                        created_at=versions[0].set_at,
                        updated_at=versions[-1].set_at,
                        set_by=versions[-1].set_by,
                    )
                )
        return scopes


class VersionTaken(Rejected):
    """The version the value was sealed for is not the next one any more (another set came first)."""


class TooManySecrets(Rejected):
    pass


class AlreadyRewrapped(Rejected):
    """The version is no longer sealed by the key the re-wrap started from (another re-wrap came first)."""


def _decide(state: Secrets, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    match command:
        case SetSecret():
            if command.name not in state.by_name and len(state.by_name) >= MAX_SECRET_NAMES:
                raise TooManySecrets(f"this org has {MAX_SECRET_NAMES} secrets, the most it may have")
            expected = state.next_version(command.name)
            if command.version != expected:
                raise VersionTaken(
                    f"secret {command.name} is at version {expected - 1}: version {command.version} was sealed "
                    f"for another state; seal it again for version {expected}"
                )
            return [
                SecretVersionSet(
                    at=ctx.now,
                    name=command.name,
                    version=command.version,
                    environment=command.environment,
                    key_id=command.key_id,
                    wrapped_key=command.wrapped_key,
                    nonce=command.nonce,
                    ciphertext=command.ciphertext,
                    set_by=ctx.actor.id,
                )
            ]
        case RewrapSecret():
            found = state.version(command.name, command.version)
            if found is None:
                raise NotFound(f"secret {command.name} has no version {command.version}")
            if found.key_id != command.from_key_id:
                raise AlreadyRewrapped(
                    f"version {command.version} of secret {command.name} is sealed by master key {found.key_id} "
                    f"now, not {command.from_key_id}"
                )
            return [
                SecretVersionRewrapped(
                    at=ctx.now,
                    name=command.name,
                    version=command.version,
                    from_key_id=command.from_key_id,
                    key_id=command.key_id,
                    wrapped_key=command.wrapped_key,
                    by=ctx.actor.id,
                )
            ]
    raise TypeError(f"secrets aggregate does not handle {type(command).__name__}")


def _evolve(state: Secrets, event: Event) -> Secrets:
    match event:
        case SecretVersionSet() if event.version == state.next_version(event.name):
            sealed = SealedVersion(
                name=event.name,
                version=event.version,
                environment=event.environment,
                key_id=event.key_id,
                wrapped_key=event.wrapped_key,
                nonce=event.nonce,
                ciphertext=event.ciphertext,
                set_at=event.at,
                set_by=event.set_by,
            )
            return Secrets(by_name={**state.by_name, event.name: (*state.by_name.get(event.name, ()), sealed)})
        case SecretVersionRewrapped():
            found = state.version(event.name, event.version)
            if found is None or found.key_id != event.from_key_id:
                return state
            rewrapped = msgspec.structs.replace(found, key_id=event.key_id, wrapped_key=event.wrapped_key)
            versions = tuple(rewrapped if known is found else known for known in state.by_name[event.name])
            return Secrets(by_name={**state.by_name, event.name: versions})
    return state


SECRETS = Decider[Secrets](
    aggregate=SECRETS_AGGREGATE,
    commands=(SetSecret, RewrapSecret),
    initial=Secrets(),
    decide=_decide,
    evolve=_evolve,
    timers=no_timers,
    aggregate_id=lambda command: SECRETS_ID,
)
