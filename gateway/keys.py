"""API keys: created and revoked through the log; the key is shown once and only its hash is kept."""

from __future__ import annotations

from contextlib import suppress

from starlette.requests import Request
from starlette.responses import Response

from application.bodies import CreateApiKeyBody
from core.domain.access import issue_key
from core.domain.commands import CreateApiKey, RevokeApiKey
from gateway.http import body, json, path_id, principal, services
from gateway.services import Services
from projections.read import DATABASE_UNAVAILABLE

KEY_PROPAGATION_SECONDS = 5.0


async def create(request: Request) -> Response:
    who = await principal(request, "admin")
    spec = await body(request, CreateApiKeyBody)
    issued = issue_key()
    command = CreateApiKey(key_id=issued.key_id, name=spec.name, roles=spec.roles, secret_sha256=issued.secret_sha256)
    svc = services(request)
    outcome = await svc.handler.handle(who.org, command, actor=who.actor)
    await _propagated(svc, outcome.seq)  # usable at once on every gateway
    return json(
        {
            "id": issued.key_id,
            "key": issued.key,
            "name": spec.name,
            "roles": sorted(set(spec.roles)),
            "seq": outcome.seq,
        },
        201,
    )


async def _propagated(svc: Services, seq: int) -> None:
    """Wait (bounded) until other gateways can look the key up. The write is done either way: while
    PostgreSQL is down this gateway knows the key from its own write and the others learn it later."""
    with suppress(*DATABASE_UNAVAILABLE):
        await svc.read_model.wait_for("access", seq, timeout=KEY_PROPAGATION_SECONDS)


async def revoke(request: Request) -> Response:
    who = await principal(request, "admin")
    key_id = path_id(request, "key_id", "api key")
    svc = services(request)
    outcome = await svc.handler.handle(who.org, RevokeApiKey(key_id=key_id), actor=who.actor)
    # Refused here at once; other gateways stop accepting it within their key cache time (5 s).
    await _propagated(svc, outcome.seq)
    svc.auth.forget(key_id)
    return Response(status_code=204)
