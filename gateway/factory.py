"""Opening and closing the gateway's connections, from settings in the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from application.breakers import LeaseExpiries
from application.claim_index import ClaimIndex
from application.idempotency import IdempotencyRecords
from application.policy import SubmitGate
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from core.secret_box import MASTER_KEY_ENV, PREVIOUS_KEYS_ENV, SecretBox
from gateway.auth import Authenticator, JwtSettings
from gateway.console.sessions import SessionStore
from gateway.keyring import KeyRing
from gateway.scheduler import Scheduler
from gateway.services import Limits, Metrics, Services
from projections.read import ReadModel
from projections.schema import migrate


@dataclass
class GatewaySettings:
    nats_url: str
    database_url: str
    jwt: JwtSettings = field(default_factory=JwtSettings)
    limits: Limits = field(default_factory=Limits)
    scheduler: bool = True
    """Run the scheduler (schedules' fires) in this gateway; every gateway may: they share its consumer."""
    secrets_key: str | None = None
    """``CP_SECRETS_KEY``: the master key that seals secrets (base64 of 32 bytes); without it no secrets."""
    secrets_previous_keys: str | None = None
    """``CP_SECRETS_PREVIOUS_KEYS``: master keys ``secrets_key`` replaced (comma-separated), which open
    what they sealed and seal nothing (``core.secret_box``)."""

    @classmethod
    def from_env(cls, nats_url: str, database_url: str) -> GatewaySettings:
        """``CP_JWT_HS256_SECRET``, ``CP_JWT_RS256_PUBLIC_KEY_FILE``, ``CP_JWT_JWKS_URL``, ``CP_JWT_AUDIENCE``,
        ``CP_JWT_ISSUER`` (both required when one of the three before is set),
        ``CP_RATE_LIMIT_RPS``, ``CP_RATE_LIMIT_BURST``, ``CP_MAX_BODY_BYTES``, ``CP_MAX_BLOCK_MS``,
        ``CP_AUTH_FAILURES_PER_SECOND``, ``CP_AUTH_FAILURE_BURST``, ``CP_SSE_MAX_PER_CREDENTIAL``,
        ``CP_SSE_MAX_PER_ORG``, ``CP_SECRETS_KEY``, ``CP_SECRETS_PREVIOUS_KEYS``."""
        env = os.environ
        public_key_file = env.get("CP_JWT_RS256_PUBLIC_KEY_FILE")
        limits = Limits()
        return cls(
            nats_url=nats_url,
            database_url=database_url,
            jwt=JwtSettings(
                hs256_secret=env.get("CP_JWT_HS256_SECRET") or None,
                rs256_public_key=Path(public_key_file).read_text() if public_key_file else None,
                jwks_url=env.get("CP_JWT_JWKS_URL") or None,
                audience=env.get("CP_JWT_AUDIENCE") or None,
                issuer=env.get("CP_JWT_ISSUER") or None,
            ),
            limits=Limits(
                max_body_bytes=int(env.get("CP_MAX_BODY_BYTES", limits.max_body_bytes)),
                requests_per_second=float(env.get("CP_RATE_LIMIT_RPS", limits.requests_per_second)),
                burst=float(env.get("CP_RATE_LIMIT_BURST", limits.burst)),
                max_block_ms=int(env.get("CP_MAX_BLOCK_MS", limits.max_block_ms)),
                failed_auth_per_second=float(env.get("CP_AUTH_FAILURES_PER_SECOND", limits.failed_auth_per_second)),
                failed_auth_burst=float(env.get("CP_AUTH_FAILURE_BURST", limits.failed_auth_burst)),
                sse_max_per_credential=int(env.get("CP_SSE_MAX_PER_CREDENTIAL", limits.sse_max_per_credential)),
                sse_max_per_org=int(env.get("CP_SSE_MAX_PER_ORG", limits.sse_max_per_org)),
            ),
            secrets_key=env.get(MASTER_KEY_ENV) or None,
            secrets_previous_keys=env.get(PREVIOUS_KEYS_ENV) or None,
        )


async def open_services(settings: GatewaySettings) -> Services:
    secret_box = (  # a bad key is refused now, not at the first secret
        None
        if settings.secrets_key is None
        else SecretBox.from_text(settings.secrets_key, settings.secrets_previous_keys)
    )
    store = await JetStreamEventStore.connect(settings.nats_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=10)
    await migrate(pool)
    read_model = ReadModel(pool)
    metrics = Metrics()
    lease_expiries = LeaseExpiries()  # given the handler below: the index starts following first
    claim_index = ClaimIndex(
        store.nc, read_model, stream=store.stream, observer=metrics.events, on_lease_expired=lease_expiries
    )
    await claim_index.start()

    def on_commit(subject: str, state: object, seq: int) -> None:
        claim_index.observe(subject, state, seq)
        keyring.observe(subject, state, seq)
        submit_gate.observe(subject, state, seq)

    handler = CommandHandler(store, on_commit=on_commit)
    lease_expiries.handler = handler
    keyring = KeyRing(handler, read_model)
    submit_gate = await SubmitGate.open(handler, claim_index, read_model)
    auth = Authenticator(keyring.lookup, settings.jwt)
    services = Services(
        store=store,
        handler=handler,
        read_model=read_model,
        claim_index=claim_index,
        submit_gate=submit_gate,
        auth=auth,
        idempotency=await IdempotencyRecords.open(store),
        sessions=await SessionStore.open(store, auth),
        limits=settings.limits,
        metrics=metrics,
        secret_box=secret_box,
    )
    if settings.scheduler:
        services.scheduler = Scheduler(services)
        await services.scheduler.start()
    return services


async def close_services(svc: Services) -> None:
    if svc.scheduler is not None:
        await svc.scheduler.stop()
    svc.submit_gate.close()
    await svc.claim_index.stop()
    if isinstance(svc.claim_index.on_lease_expired, LeaseExpiries):
        await svc.claim_index.on_lease_expired.close()
    await svc.read_model.close()
    await svc.read_model.pool.close()
    await svc.store.close()
