"""How submits read an org's environments (``application.environments``): callers that arrive together
share one read of the log, and no caller ever gets an answer from a read that started before it
arrived, so a change committed before a submit began is always in its answer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from application.environments import EnvironmentDirectory
from core.domain.commands import Actor, DefineEnvironment
from core.domain.records import RecordedEvent
from core.log.handler import CommandHandler
from core.log.memory_store import InMemoryEventStore

ORG = "acme"
ADMIN = Actor("ops", frozenset({"admin"}))


class CountedStore(InMemoryEventStore):
    """The in-memory log, counting reads; while ``held`` is set, a read waits for it to clear after
    taking its answer (a direct get answered, its reply not yet handed back)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.held: asyncio.Event | None = None

    async def read_subject(self, subject: str, *, after_seq: int = 0) -> list[RecordedEvent]:
        self.reads += 1
        answer = await super().read_subject(subject, after_seq=after_seq)
        if self.held is not None:
            await self.held.wait()
        return answer


def define(queues: tuple[str, ...]) -> DefineEnvironment:
    return DefineEnvironment(name="prod", queues=queues, replace=True)


async def deploys_in_prod() -> tuple[CountedStore, CommandHandler, EnvironmentDirectory]:
    """A log where queue ``deploys`` is in ``prod``, its command handler, and a directory reading it."""
    store = CountedStore()
    commands = CommandHandler(store, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    await commands.handle(ORG, define(("deploys",)), actor=ADMIN)
    return store, commands, EnvironmentDirectory(store)


async def test_concurrent_callers_share_reads_and_all_see_the_log() -> None:
    store, _, environments = await deploys_in_prod()

    answers = await asyncio.gather(*(environments.current(ORG) for _ in range(50)))

    assert store.reads == 1  # all fifty arrived before the read started
    assert {(state.of_queue("deploys").name, seq) for state, seq in answers} == {("prod", 1)}  # type: ignore[union-attr]
    await environments.current(ORG)
    assert store.reads == 2  # a caller arriving after the read is done reads again


async def test_a_change_committed_while_a_read_is_in_flight_is_seen_by_a_caller_arriving_after_it() -> None:
    store, commands, environments = await deploys_in_prod()
    store.held = asyncio.Event()

    early = asyncio.create_task(environments.current(ORG))
    while store.reads == 0:  # the early read has its answer: the log as it was before the change
        await asyncio.sleep(0)
    await commands.handle(ORG, define(("hotfix",)), actor=ADMIN)
    late = asyncio.create_task(environments.current(ORG))  # arrives after the change was committed
    await asyncio.sleep(0)
    store.held.set()

    await early  # its answer may be the older state, or the newer one the late read folded meanwhile
    late_state, late_seq = await late
    assert late_state.of_queue("hotfix") is not None and late_seq == 2
    assert late_state.of_queue("deploys") is None
    assert store.reads == 2


async def test_a_caller_that_gives_up_does_not_fail_the_callers_sharing_its_read() -> None:
    store, _, environments = await deploys_in_prod()
    store.held = asyncio.Event()

    quitter = asyncio.create_task(environments.current(ORG))
    stayer = asyncio.create_task(environments.current(ORG))
    while store.reads == 0:
        await asyncio.sleep(0)
    quitter.cancel()
    store.held.set()

    state, seq = await stayer
    assert (state.of_queue("deploys").name, seq) == ("prod", 1)  # type: ignore[union-attr]
    assert quitter.cancelled() and store.reads == 1
