"""Health, readiness, metrics and stats."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from gateway.http import json, principal, services
from gateway.problems import problem_response
from projections.projector import Projector


async def healthz(request: Request) -> Response:
    return json({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    checks: dict[str, str] = {}
    if not svc.store.nc.is_connected:
        checks["nats"] = "not connected"
    try:
        async with asyncio.timeout(2):
            await svc.read_model.ping()
    except Exception as exc:
        checks["postgres"] = f"unreachable: {exc!r}"
    try:
        lag = await projection_lag(request)
    except Exception as exc:
        checks["projections"] = f"unreachable: {exc!r}"
        lag = {}
    if checks:
        return problem_response(503, "not ready: " + "; ".join(f"{k} {v}" for k, v in checks.items()))
    gate = svc.submit_gate
    policy = {"engine": gate.engine.name, "bundle_digest": gate.bundle.digest}
    return json({"status": "ready", "projection_lag": lag, "policy": policy})


async def projection_lag(request: Request) -> dict[str, int]:
    """Events in the log that each projection has not folded yet."""
    svc = services(request)
    return await Projector(svc.read_model.pool, svc.store.nc).lag()


async def stats(request: Request) -> Response:
    who = await principal(request, "read")
    summary = await services(request).read_model.stats(who.org)
    return json({**summary, "projection_lag": await projection_lag(request)})


async def metrics(request: Request) -> Response:
    svc = services(request)
    try:
        for name, lag in (await projection_lag(request)).items():
            svc.metrics.projection_lag.labels(projection=name).set(lag)
    except Exception:  # metrics stay available while NATS is not
        pass
    await svc.metrics.queues.refresh(svc.read_model)  # cached: at most one query per few seconds
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
