"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from core.domain.commands import SYSTEM, SubmitTask
from core.log.handler import CommandHandler
from integrations.consumer import DEAD_LETTER_STREAM


async def submit(handler: CommandHandler, org: str, task_id: str) -> int:
    """Submit a task; returns the stream sequence of its TaskSubmitted event."""
    outcome = await handler.handle(org, SubmitTask(task_id=task_id, task_type="deploy"), actor=SYSTEM)
    return outcome.seq


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while True:
            outcome = predicate()
            if await outcome if isinstance(outcome, Awaitable) else outcome:
                return
            await asyncio.sleep(0.02)


async def dead_letter_count(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info(DEAD_LETTER_STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def dead_lettered(js: JetStreamContext, subject: str, count: int = 1) -> bool:
    return await dead_letter_count(js, subject) == count


async def dead_letters(js: JetStreamContext, subject: str) -> list[Msg]:
    """Every dead letter stored on ``subject``, oldest first."""
    count = await dead_letter_count(js, subject)
    if count == 0:
        return []
    reader = await js.pull_subscribe(subject, stream=DEAD_LETTER_STREAM)
    try:
        letters: list[Msg] = []
        while len(letters) < count:
            letters += await reader.fetch(count - len(letters), timeout=5)
        return letters
    finally:
        await reader.unsubscribe()
