"""Console sessions: a random token in an HttpOnly, SameSite=Strict cookie stands for a credential
that signed in. The session itself lives in a JetStream key-value bucket (keyed by the token's hash,
so the bucket never holds a usable token), which every gateway reads: signing out ends it everywhere at
once, and a revoked API key ends its sessions as soon as a gateway sees the revocation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from application.principal import Principal
from core.domain.commands import Actor
from core.log.store import JetStreamEventStore
from gateway.auth import Authenticator

BUCKET = "CP_CONSOLE_SESSIONS"
SESSION_COOKIE = "cp_session"
SESSION_SECONDS = 8 * 3600
"""How long a sign-in lasts at most (a JWT's own expiry ends it sooner)."""


class ConsoleSession(msgspec.Struct, frozen=True):
    org: str
    actor_id: str
    roles: tuple[str, ...]
    credential_id: str
    csrf_token: str
    """Every state-changing console request must echo it (a form field or the X-CSRF-Token header)."""
    expires_at: float
    """Unix time."""

    def principal(self) -> Principal:
        return Principal(self.org, Actor(self.actor_id, frozenset(self.roles)), self.credential_id)

    def csrf_matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.csrf_token.encode())


def _kv_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, kv: KeyValue, auth: Authenticator, clock: Callable[[], float] = time.time) -> None:
        self._kv, self._auth, self._clock = kv, auth, clock

    @classmethod
    async def open(cls, store: JetStreamEventStore, auth: Authenticator) -> SessionStore:
        return cls(await store.key_value(BUCKET, ttl_seconds=SESSION_SECONDS), auth)

    def now(self) -> float:
        return self._clock()

    async def start(self, who: Principal, *, not_after: float | None = None) -> tuple[str, ConsoleSession]:
        """A new session for a credential that just authenticated; the token goes into the cookie."""
        token = secrets.token_urlsafe(32)
        expires_at = self._clock() + SESSION_SECONDS
        if not_after is not None:
            expires_at = min(expires_at, not_after)
        session = ConsoleSession(
            org=who.org,
            actor_id=who.actor.id,
            roles=tuple(sorted(who.actor.roles)),
            credential_id=who.credential_id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=expires_at,
        )
        await self._kv.put(_kv_key(token), msgspec.json.encode(session))
        return token, session

    async def find(self, token: str | None) -> ConsoleSession | None:
        """The live session of a cookie's token, or None when it is unknown, expired, signed out, or
        its API key was revoked."""
        if not token or len(token) > 128:
            return None
        try:
            entry = await self._kv.get(_kv_key(token))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        session = msgspec.json.decode(entry.value, type=ConsoleSession)
        if session.expires_at <= self._clock() or not await self._auth.still_valid(session.principal()):
            await self.end(token)
            return None
        return session

    async def end(self, token: str) -> None:
        await self._kv.delete(_kv_key(token))
