"""A whole stack for HTTP tests: real nats-server and PostgreSQL, a fresh database, the projector,
and the gateway on uvicorn on a free 127.0.0.1 port, with two orgs and a key per role."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from controlplane.devstack import with_database
from controlplane.embedded import EmbeddedNats, free_port
from controlplane.seed import seed_org
from controlplane.stack import database_logins
from core.domain.ids import new_id
from core.secret_box import generate_key_text
from gateway.app import build_app
from gateway.auth import JwtSettings
from gateway.factory import GatewaySettings, close_services, open_services
from gateway.services import Limits, Services
from projections.projector import Projector
from projections.roles import GATEWAY_ROLE, LOGIN_ROLES, PROJECTOR_ROLE

ROLES = ("admin", "submitter", "worker", "approver", "viewer")
HS256_SECRET = "test-secret-that-is-long-enough-for-hs256"
JWT_AUDIENCE = "controlplane-tests"
JWT_ISSUER = "https://issuer.test"
JWT_SCOPE = {"aud": JWT_AUDIENCE, "iss": JWT_ISSUER}
"""The claims every token for the test gateway carries besides its own."""


@dataclass
class Stack:
    url: str
    keys: dict[str, dict[str, str]]  # org -> role -> key
    services: Services
    projector: Projector
    rsa_private_pem: bytes
    database_logins: dict[str, str]
    """The URL each least-privilege role (``cp_gateway``, ``cp_projector``) logs in with, and ``owner``'s."""
    secrets_key: str
    """The gateway's ``CP_SECRETS_KEY``, for the processes a test starts beside it (the notifier)."""

    def client(self, org: str = "acme", role: str = "admin", **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.keys[org][role]}", **headers},
            timeout=20,
        )


async def new_org(stack: Stack) -> tuple[str, dict[str, str]]:
    """A fresh org with a key per role: what a test sees in it is its own (other tests' timers fire in theirs)."""
    org = f"org{new_id()[-10:]}"
    return org, await seed_org(stack.services.handler, org, ROLES)


@pytest.fixture(scope="session")
async def stack(nats_server: EmbeddedNats, database_url: str) -> AsyncIterator[Stack]:
    async with own_database(database_url, "gw") as database, serve_stack(nats_server.url, database) as served:
        yield served


@contextlib.asynccontextmanager
async def own_database(database_url: str, prefix: str) -> AsyncIterator[str]:
    """A fresh database on the suite's PostgreSQL, dropped at the end; yields its URL."""
    database = f"{prefix}_{new_id()[-12:]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    try:
        yield with_database(database_url, database)
    finally:
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def serve_stack(nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    """Gateway (uvicorn on a free port) and projector over the given servers, with the orgs acme and
    globex seeded and a key per role."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    settings = GatewaySettings(
        nats_url=nats_url,
        database_url=database_url,
        jwt=JwtSettings(
            hs256_secret=HS256_SECRET, rs256_public_key=public_pem.decode(), audience=JWT_AUDIENCE, issuer=JWT_ISSUER
        ),
        limits=Limits(sse_keepalive_seconds=1.0, max_block_ms=10_000),
        secrets_key=generate_key_text(),
    )
    # The gateway and the projector log in as their least-privilege roles, as in the dev stack: every
    # HTTP test also checks that the gateway needs no more than reading through row-level security.
    logins = await database_logins(database_url, {role: secrets.token_urlsafe(16) for role in LOGIN_ROLES})
    services = await open_services(dataclasses.replace(settings, database_url=logins[GATEWAY_ROLE]))
    projector_pool = await asyncpg.create_pool(logins[PROJECTOR_ROLE], min_size=1, max_size=3)
    projector = Projector(projector_pool, services.store.nc)
    await projector.start()
    keys = {org: await seed_org(services.handler, org, ROLES) for org in ("acme", "globex")}
    await projector.run_until_caught_up()

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(services), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield Stack(
            f"http://127.0.0.1:{port}",
            keys,
            services,
            projector,
            private_pem,
            {**logins, "owner": database_url},
            settings.secrets_key or "",
        )
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(serving, 10)
        await projector.stop()
        await projector_pool.close()
        await close_services(services)


@contextlib.asynccontextmanager
async def own_stack(directory: Path, database_url: str) -> AsyncIterator[Stack]:
    """A whole stack of its own: nats-server (in ``directory``), a fresh database on the suite's
    PostgreSQL, gateway and projector. Not the suite's NATS: two projectors on one stream would share
    its durable consumers, and one of them would never catch up."""
    with EmbeddedNats(directory) as nats_server:
        async with own_database(database_url, "own") as database, serve_stack(nats_server.url, database) as served:
            yield served
