"""``POST /v1/workers/{id}/reset``: an admin closes a worker's open circuit breaker. The breakers
themselves (attempt records, the open check before a claim) are the application layer's
(``application/breakers.py``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from core.domain.commands import ResetWorkerBreaker
from gateway.http import handled, json, path_id, principal, services
from gateway.views import worker_document


async def reset(request: Request) -> Response:
    """``POST /v1/workers/{id}/reset`` (admin): close the worker's open breaker now."""
    who = await principal(request, "admin")
    worker_id = path_id(request, "worker_id", "worker")
    svc = services(request)
    # A breaker that is not open: 409 (InvalidTransition).
    outcome = await handled(request, who, ResetWorkerBreaker(worker_id=worker_id), "reset", worker_id)
    row = await svc.read_model.get_worker(who.org, worker_id)
    return json(worker_document(outcome.state, 0 if row is None else row[1], outcome.seq))
