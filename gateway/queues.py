"""Queue settings: an org's admin sets, per queue, which waiting worker gets the next task (the claim
strategy) and when a worker's circuit breaker opens. A queue without settings has the defaults
(``fifo``; 3 consecutive failed attempts open a worker's breaker for 60 s).

``PUT /v1/queues/{name}`` sets a queue's settings whole, ``DELETE`` brings back the defaults,
``GET /v1/queues`` lists the queues that have settings and ``GET /v1/queues/{name}`` shows any queue's.
Reads come from the log (one small aggregate per org), so every read shows every write before it."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core.domain.commands import ConfigureQueue, RemoveQueueSettings
from core.domain.queues import QUEUES_AGGREGATE, QUEUES_ID, Queues, QueueSettings
from core.log.handler import CommandHandler
from gateway.bodies import QueueSettingsBody
from gateway.http import body, command_id, json, path_id, principal, services

SETTINGS_STALENESS_SECONDS = 1.0
"""How old a copy of the settings claims and attempt records may use: a change made on another
gateway applies here within this time, instead of a read of the log on every claim."""


async def settings_of(handler: CommandHandler, org: str, queue: str) -> QueueSettings:
    """The queue's settings for the hot paths (claims, attempt records): at most a second old."""
    queues, _ = await handler.load(org, QUEUES_AGGREGATE, QUEUES_ID, max_age=SETTINGS_STALENESS_SECONDS)
    assert isinstance(queues, Queues)
    return queues.of(queue)


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
    outcome = await services(request).handler.handle(
        who.org, command, actor=who.actor, command_id=command_id(request, who, "queue", name, fingerprint)
    )
    return json(queue_document(outcome.state.of(name), outcome.seq))


async def remove(request: Request) -> Response:
    who = await principal(request, "admin")
    name = path_id(request, "name", "queue")
    outcome = await services(request).handler.handle(
        who.org, RemoveQueueSettings(queue=name), actor=who.actor, command_id=command_id(request, who, "queue", name)
    )
    return json(queue_document(outcome.state.of(name), outcome.seq))


async def list_queues(request: Request) -> Response:
    who = await principal(request, "read")
    queues, seq = await services(request).handler.load(who.org, QUEUES_AGGREGATE, QUEUES_ID)
    return json({"items": [queue_document(settings, seq) for settings in queues.listed()], "seq": seq})


async def get_queue(request: Request) -> Response:
    who = await principal(request, "read")
    name = path_id(request, "name", "queue")
    queues, seq = await services(request).handler.load(who.org, QUEUES_AGGREGATE, QUEUES_ID)
    return json(queue_document(queues.of(name), seq))
