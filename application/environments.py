"""The org's environments as submits read them: from the log, at every use.

A submit's environment decides whether it needs approval, so it must never come from a stale copy:
an admin who puts a queue into ``prod`` on one gateway must gate the next submit on every gateway.
The environments of an org are one small aggregate (``cp.<org>.environments.all``), so each read asks
the log only for the events after the ones already folded here: one direct get, which finds nothing
new almost always.

Submits that arrive together share that direct get: the first caller for an org schedules a read that
starts on the event loop's next iteration, and every caller for that org arriving before it starts
joins it. A read that has started is never joined (it may have been answered before a later caller's
change was committed), so whatever was committed before a caller arrived is in its answer. Reads of an
org run concurrently otherwise, without a lock: each folds only the events newer than the state it
finds when its answer arrives."""

from __future__ import annotations

import asyncio

from core.domain.environments import ENVIRONMENTS, ENVIRONMENTS_AGGREGATE, ENVIRONMENTS_ID, Environments
from core.domain.subjects import aggregate_subject
from core.log.event_store import EventStore
from core.lru import Lru

ORGS_REMEMBERED = 4096


class EnvironmentDirectory:
    def __init__(self, store: EventStore, size: int = ORGS_REMEMBERED) -> None:
        self._store = store
        self._folded: Lru[str, tuple[Environments, int]] = Lru(size)
        self._not_started: dict[str, asyncio.Task[tuple[Environments, int]]] = {}
        """Per org, the read that callers may still join: scheduled, its request not sent yet."""

    async def current(self, org: str) -> tuple[Environments, int]:
        """The org's environments as the log holds them now, and the sequence of their last event (0:
        none was ever defined). Everything committed before this call is in the answer."""
        read = self._not_started.get(org)
        if read is None:
            read = self._not_started[org] = asyncio.get_running_loop().create_task(self._read(org))
        # Shielded: a caller that gives up must not cancel the read the others joined.
        return await asyncio.shield(read)

    async def _read(self, org: str) -> tuple[Environments, int]:
        del self._not_started[org]  # from here on, later callers start a read of their own
        subject = aggregate_subject(org, ENVIRONMENTS_AGGREGATE, ENVIRONMENTS_ID)
        _, known = self._folded.get(org) or (ENVIRONMENTS.initial, 0)
        newer = await self._store.read_subject(subject, after_seq=known)
        # Another read may have folded further meanwhile: continue from whatever is here now.
        state, seq = self._folded.get(org) or (ENVIRONMENTS.initial, 0)
        for item in newer:
            if item.seq > seq:
                state, seq = ENVIRONMENTS.evolve(state, item.event), item.seq
        self._folded.put(org, (state, seq))
        return state, seq
