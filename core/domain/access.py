"""Orgs and API keys, as aggregates on the log like everything else: the keys table of the read
model can be dropped and rebuilt, and an audit shows who created or revoked which credential.

A key reads ``cp_<key id>_<secret>``; the log keeps only the SHA-256 of the secret. Secrets are 256
random bits, so a fast hash is enough (no password-style stretching needed)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import datetime

import msgspec

from core.domain.commands import Command, CreateApiKey, CreateOrg, RevokeApiKey
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.errors import AlreadyExists, NotFound
from core.domain.events import ApiKeyCreated, ApiKeyRevoked, Event, OrgCreated
from core.domain.ids import new_id

KEY_PREFIX = "cp_"


class Org(msgspec.Struct, frozen=True):
    id: str
    name: str
    created_at: datetime


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    roles: tuple[str, ...]
    secret_sha256: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None = None


class IssuedKey(msgspec.Struct, frozen=True):
    key_id: str
    key: str
    secret_sha256: str


def issue_key() -> IssuedKey:
    key_id = new_id()
    secret = secrets.token_urlsafe(32)
    return IssuedKey(key_id, f"{KEY_PREFIX}{key_id}_{secret}", hashlib.sha256(secret.encode()).hexdigest())


def parse_key(key: str) -> tuple[str, str] | None:
    """``(key id, sha256 of the secret)`` of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not key_id or not secret or len(key) > 200:
        return None
    return key_id, hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(stored_sha256: str, presented_sha256: str) -> bool:
    return hmac.compare_digest(stored_sha256, presented_sha256)


def _decide_org(state: Org | None, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    assert isinstance(command, CreateOrg)
    if state is not None:
        raise AlreadyExists(f"org {command.org} already exists")
    return [OrgCreated(at=ctx.now, org=command.org, name=command.name, created_by=ctx.actor.id)]


def _evolve_org(state: Org | None, event: Event) -> Org | None:
    if isinstance(event, OrgCreated) and state is None:
        return Org(id=event.org, name=event.name, created_at=event.at)
    return state


def _decide_key(state: ApiKey | None, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    match command:
        case CreateApiKey():
            if state is not None:
                raise AlreadyExists(f"api key {command.key_id} already exists")
            return [
                ApiKeyCreated(
                    at=ctx.now,
                    key_id=command.key_id,
                    name=command.name,
                    roles=tuple(sorted(set(command.roles))),
                    secret_sha256=command.secret_sha256,
                    created_by=ctx.actor.id,
                )
            ]
        case RevokeApiKey():
            if state is None or state.revoked_at is not None:
                raise NotFound(f"api key {command.key_id} not found")
            return [ApiKeyRevoked(at=ctx.now, key_id=command.key_id, revoked_by=ctx.actor.id)]
    raise TypeError(f"api key aggregate does not handle {type(command).__name__}")


def _evolve_key(state: ApiKey | None, event: Event) -> ApiKey | None:
    match event:
        case ApiKeyCreated() if state is None:
            return ApiKey(
                id=event.key_id,
                name=event.name,
                roles=event.roles,
                secret_sha256=event.secret_sha256,
                created_by=event.created_by,
                created_at=event.at,
            )
        case ApiKeyRevoked() if state is not None:
            return msgspec.structs.replace(state, revoked_at=event.at)
    return state


ORG = Decider[Org | None](
    aggregate="org",
    commands=(CreateOrg,),
    initial=None,
    decide=_decide_org,
    evolve=_evolve_org,
    timers=no_timers,
    aggregate_id=lambda command: command.org,  # type: ignore[attr-defined]
)

API_KEY = Decider[ApiKey | None](
    aggregate="apikey",
    commands=(CreateApiKey, RevokeApiKey),
    initial=None,
    decide=_decide_key,
    evolve=_evolve_key,
    timers=no_timers,
    aggregate_id=lambda command: command.key_id,  # type: ignore[attr-defined]
)
