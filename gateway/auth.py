"""Credentials: hashed API keys from the read model, or JWT bearer tokens (HS256 with a shared
secret, RS256 with a public key, or RS256/ES256 with keys from the issuer's JWKS URL, so the issuer can
rotate them). A JWT must name this gateway's audience and the trusted issuer: without both, any token
signed by the key would do, including one the issuer made for another service. The org always comes
from the credential, never from a body. What a principal's roles permit is the application layer's
(``application/principal.py``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt

from application.principal import Principal
from core.domain.access import parse_key, secret_matches
from core.domain.commands import ROLES, Actor
from core.domain.ids import InvalidToken, validate_token
from core.lru import Lru
from gateway.problems import Problem


@dataclass(frozen=True)
class KeyRecord:
    org: str
    roles: tuple[str, ...]
    secret_sha256: str
    revoked: bool


KeyLookup = Callable[[str], Awaitable[KeyRecord | None]]


JWKS_ALGORITHMS = ("RS256", "ES256")
JWKS_CACHE_SECONDS = 300
"""How long a fetched key set is used before it is fetched again. A token naming a key id the set
lacks fetches it at once (a rotation), at most once per ``jwks_refetch_seconds`` so that tokens with
made-up key ids cannot make the gateway hammer the identity provider."""


@dataclass
class JwtSettings:
    hs256_secret: str | None = None
    rs256_public_key: str | None = None
    jwks_url: str | None = None
    audience: str | None = None
    issuer: str | None = None
    jwks_refetch_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.enabled and not (self.audience and self.issuer):
            raise ValueError(
                "JWT authentication is on but the audience or the issuer is missing: set CP_JWT_AUDIENCE (what "
                "tokens for this gateway name in `aud`) and CP_JWT_ISSUER (the `iss` of the identity provider)"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.hs256_secret or self.rs256_public_key or self.jwks_url)


@dataclass
class Authenticator:
    """Checks bearer credentials. An API key's record is remembered for ``cache_seconds``, and so is a key
    id that names no key (a failed lookup costs a lookup once, then nothing); both caches hold a bounded
    number of key ids. A key id that is not even well-formed is refused without any lookup."""

    lookup_key: KeyLookup
    jwt: JwtSettings = field(default_factory=JwtSettings)
    cache_seconds: float = 5.0
    cache_size: int = 4096
    unknown_cache_size: int = 4096
    clock: Callable[[], float] = time.monotonic
    _known: Lru[str, tuple[float, KeyRecord]] = field(init=False)
    _unknown: Lru[str, float] = field(init=False)
    _jwks: jwt.PyJWKClient | None = field(init=False)

    def __post_init__(self) -> None:
        self._known = Lru(self.cache_size)
        self._unknown = Lru(self.unknown_cache_size)  # apart, so unknown ids can never evict known keys
        self._jwks = (
            None
            if self.jwt.jwks_url is None
            else jwt.PyJWKClient(
                self.jwt.jwks_url,
                lifespan=JWKS_CACHE_SECONDS,
                timeout=5,
                cooldown_duration=self.jwt.jwks_refetch_seconds,
            )
        )

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Problem(401, "send Authorization: Bearer <api key or JWT>", headers={"WWW-Authenticate": "Bearer"})
        token = authorization[7:].strip()
        if parsed := parse_key(token):
            return await self._from_key(*parsed)
        if token.count(".") == 2 and self.jwt.enabled:
            return await self._from_jwt(token)
        raise Problem(401, "the credential is not a valid API key or JWT", headers={"WWW-Authenticate": "Bearer"})

    async def still_valid(self, who: Principal) -> bool:
        """Whether a credential that authenticated earlier (a console session's) is still good: an API
        key must still exist unrevoked; a JWT's expiry bounds the session that stands for it."""
        if who.credential_id.startswith("jwt:"):
            return True
        record = await self._record(who.credential_id)
        return record is not None and not record.revoked and record.org == who.org

    def forget(self, key_id: str) -> None:
        self._known.pop(key_id)
        self._unknown.pop(key_id)

    async def _record(self, key_id: str) -> KeyRecord | None:
        now = self.clock()
        known = self._known.get(key_id)
        if known is not None and now - known[0] < self.cache_seconds:
            return known[1]
        unknown_since = self._unknown.get(key_id)
        if unknown_since is not None and now - unknown_since < self.cache_seconds:
            return None
        record = await self.lookup_key(key_id)
        if record is None:
            self._known.pop(key_id)
            self._unknown.put(key_id, now)
        else:
            self._unknown.pop(key_id)
            self._known.put(key_id, (now, record))
        return record

    async def _verification_key(self, token: str) -> tuple[str, Any]:
        algorithm = jwt.get_unverified_header(token).get("alg")
        if algorithm == "HS256" and self.jwt.hs256_secret:
            return algorithm, self.jwt.hs256_secret
        if algorithm == "RS256" and self.jwt.rs256_public_key:
            return algorithm, self.jwt.rs256_public_key
        if algorithm in JWKS_ALGORITHMS and self._jwks is not None:
            # PyJWKClient fetches with blocking urllib: off the event loop.
            signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            return algorithm, signing_key.key
        raise Problem(401, f"JWT algorithm {algorithm!r} is not accepted here", headers={"WWW-Authenticate": "Bearer"})

    async def _from_key(self, key_id: str, secret_sha256: str) -> Principal:
        try:
            validate_token(key_id, "API key id")
        except InvalidToken:  # no key has such an id: not worth a lookup
            raise Problem(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"}) from None
        record = await self._record(key_id)
        if record is None or record.revoked or not secret_matches(record.secret_sha256, secret_sha256):
            raise Problem(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return Principal(record.org, Actor(f"key:{key_id}", frozenset(record.roles)), key_id)

    async def _from_jwt(self, token: str) -> Principal:
        try:
            algorithm, key = await self._verification_key(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.jwt.audience,
                issuer=self.jwt.issuer,
                options={"require": ["exp", "sub", "aud", "iss"]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            raise Problem(503, f"cannot fetch the JWT signing keys: {exc}", headers={"Retry-After": "5"}) from exc
        except jwt.PyJWTError as exc:
            raise Problem(401, f"invalid JWT: {exc}", headers={"WWW-Authenticate": "Bearer"}) from exc
        try:
            org = validate_token(claims.get("org"), "org claim")
        except InvalidToken as exc:
            raise Problem(401, f"invalid JWT: {exc}") from exc
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not set(roles) <= ROLES:
            raise Problem(401, f"invalid JWT: roles must be a list of {sorted(ROLES)}")
        subject = str(claims["sub"])
        return Principal(org, Actor(f"jwt:{subject}", frozenset(roles)), f"jwt:{subject}")
