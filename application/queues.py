"""Queue settings on the hot paths (claims, attempt records): read from the org's queues aggregate on
the log, never from a read model, so a change applies within ``SETTINGS_STALENESS_SECONDS`` on every
process without a read of the log on every claim."""

from __future__ import annotations

from core.domain.queues import QUEUES_AGGREGATE, QUEUES_ID, Queues, QueueSettings
from core.log.handler import CommandHandler

SETTINGS_STALENESS_SECONDS = 1.0
"""How old a copy of the settings claims and attempt records may use: a change made on another
gateway applies here within this time, instead of a read of the log on every claim."""


async def settings_of(handler: CommandHandler, org: str, queue: str) -> QueueSettings:
    """The queue's settings for the hot paths (claims, attempt records): at most a second old."""
    queues, _ = await handler.load(org, QUEUES_AGGREGATE, QUEUES_ID, max_age=SETTINGS_STALENESS_SECONDS)
    assert isinstance(queues, Queues)
    return queues.of(queue)
