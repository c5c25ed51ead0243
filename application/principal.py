"""Who acts: an org, an actor with roles, and the credential that authenticated it, whatever the entry
point (an API key or a JWT over HTTP, a console session). What each role may do is decided here, so
every entry point applies the same rules."""

from __future__ import annotations

from dataclasses import dataclass

from core.domain.commands import Actor
from core.domain.errors import NotPermitted

# What each role may do; admin may do everything.
PERMISSIONS: dict[str, frozenset[str]] = {
    "submitter": frozenset({"read", "submit", "cancel", "schedule"}),
    "worker": frozenset({"read", "claim", "lease", "workers"}),
    "approver": frozenset({"read", "decide"}),
    "viewer": frozenset({"read"}),
}


def may(actor: Actor, permission: str) -> bool:
    roles = actor.roles
    return "admin" in roles or any(permission in PERMISSIONS.get(role, ()) for role in roles)


def require(actor: Actor, permission: str) -> None:
    """Raises ``NotPermitted`` unless one of the actor's roles grants ``permission``."""
    if not may(actor, permission):
        raise NotPermitted(f"this credential (roles {sorted(actor.roles)}) may not {permission}")


@dataclass(frozen=True)
class Principal:
    org: str
    actor: Actor
    credential_id: str

    def may(self, permission: str) -> bool:
        return may(self.actor, permission)

    def require(self, permission: str) -> None:
        require(self.actor, permission)
