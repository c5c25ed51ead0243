"""Queue settings: an org's admin sets, per queue, which waiting worker gets the next task (the claim
strategy) and when a worker's circuit breaker opens. A queue without settings has the defaults
(``fifo``; 3 consecutive failed attempts open a worker's breaker for 60 s).

``PUT /v1/queues/{name}`` sets a queue's settings whole, ``DELETE`` brings back the defaults,
``GET /v1/queues`` lists the queues that have settings and ``GET /v1/queues/{name}`` shows any queue's.
The list comes from the ``queues`` read model once it holds the caller's own writes (``?min_seq=`` for
anyone else's); a single queue is read from the log (one small aggregate per org), and so are the
settings claims and attempt records act on (``application.queues.settings_of``)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from application.bodies import QueueSettingsBody
from core.domain.commands import ConfigureQueue, RemoveQueueSettings
from core.domain.queues import QUEUES_AGGREGATE, QUEUES_ID, QueueSettings
from gateway.http import body, handled, json, path_id, principal, read_after, services


def queue_document(settings: QueueSettings, seq: int) -> dict[str, Any]:
    return {
        "name": settings.queue,
        "strategy": settings.strategy,
        "breaker": {
            "failures": settings.breaker_failures,
            "cooldown_seconds": settings.breaker_cooldown_seconds,
        },
        "configured": settings.configured,
        "updated_at": settings.updated_at,
        "configured_by": settings.configured_by,
        "seq": seq,
    }


async def configure(request: Request) -> Response:
    who = await principal(request, "admin")
    name = path_id(request, "name", "queue")
    spec = await body(request, QueueSettingsBody)
    command = ConfigureQueue(
        queue=name,
        strategy=spec.strategy,
        breaker_failures=spec.breaker.failures,
        breaker_cooldown_seconds=spec.breaker.cooldown_seconds,
    )
    fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
    outcome = await handled(request, who, command, "queue", name, fingerprint)
    return json(queue_document(outcome.state.of(name), outcome.seq))


async def remove(request: Request) -> Response:
    who = await principal(request, "admin")
    name = path_id(request, "name", "queue")
    outcome = await handled(request, who, RemoveQueueSettings(queue=name), "queue", name)
    return json(queue_document(outcome.state.of(name), outcome.seq))


async def list_queues(request: Request) -> Response:
    who = await principal(request, "read")
    await read_after(request, "queues", who)
    configured, seq = await services(request).read_model.configured_queues(who.org)
    return json({"items": [queue_document(settings, seq) for settings in configured], "seq": seq})


async def get_queue(request: Request) -> Response:
    who = await principal(request, "read")
    name = path_id(request, "name", "queue")
    queues, seq = await services(request).handler.load(who.org, QUEUES_AGGREGATE, QUEUES_ID)
    return json(queue_document(queues.of(name), seq))
