"""An org's feed of task events is served from the claim index's tail once it is live: the log up to
the index's position first, then the events the index follows. Across that hand-off, and across a
fall-back to a consumer of its own when a slow reader overflows the tail, every event comes once, in
log order."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx
import pytest

import gateway.streams
from application.claim_index import TaskTail
from core.domain.events import TaskCancelled
from core.domain.records import RecordedEvent
from tests.gateway.conftest import Stack
from tests.gateway.test_api import _read_sse, last_seq, queue, submit


async def _submitted_ids(c: httpx.AsyncClient, q: str, count: int) -> list[str]:
    return [(await submit(c, q))["id"] for _ in range(count)]


def _task_ids(events: list[dict[str, str]]) -> list[str]:
    return [json.loads(event["data"])["aggregate_id"] for event in events]


async def _feed_of_submits(stack: Stack, q: str, *, after: int, before: int, during: int) -> list[str]:
    """Submits ``before`` tasks, opens the feed, submits ``during`` more at once while it reads; the
    task ids the feed sent, in its order."""
    async with stack.client() as c:
        early = await _submitted_ids(c, q, before)
        params = {"after": after, "types": "TaskSubmitted", "queue": q}
        async with c.stream("GET", "/v1/events", params=params) as response:
            assert response.status_code == 200
            reading = asyncio.create_task(_read_sse(response, before + during))
            late = await asyncio.gather(*(submit(c, q) for _ in range(during)))
            events = await asyncio.wait_for(reading, 15)
    ids = _task_ids(events)
    assert sorted(ids) == sorted(early + [task["id"] for task in late]), "every task once"
    seqs = [int(event["id"]) for event in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "in log order, no event twice"
    return ids


async def test_a_task_feed_sends_each_event_once_in_order_across_the_hand_off_from_the_log(stack: Stack) -> None:
    after = await last_seq(stack)
    await _feed_of_submits(stack, queue(), after=after, before=5, during=20)


async def test_a_task_feed_too_far_behind_goes_on_from_the_log_without_losing_an_event(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.streams, "TAIL_LIMIT", 1)  # any two events between two reads overflow it
    after = await last_seq(stack)
    await _feed_of_submits(stack, queue(), after=after, before=2, during=30)
    assert not stack.services.claim_index._tails, "the overflowed tails were let go"
    # Its own consumer is closed after the response, never mid-way through the client's cancellation
    # (a cancelled NATS flush left the gateway's connection deaf to JetStream replies for ~40 s).
    await asyncio.sleep(0.5)
    async with asyncio.timeout(3):
        assert await last_seq(stack) > after


async def test_a_closed_task_feed_lets_its_tail_go(stack: Stack) -> None:
    async with stack.client() as c:
        params = {"after": await last_seq(stack), "types": "ApprovalRequested"}
        async with c.stream("GET", "/v1/events", params=params) as response:
            assert response.status_code == 200
            assert stack.services.claim_index._tails
    for _ in range(50):
        if not stack.services.claim_index._tails:
            break
        await asyncio.sleep(0.05)
    assert not stack.services.claim_index._tails


def _recorded(seq: int) -> RecordedEvent:
    moment = datetime.now(UTC)
    return RecordedEvent(seq, "cp.acme.task.t1", TaskCancelled(at=moment, by="test", reason=None), moment)


async def test_a_tail_hands_over_what_came_and_overflows_past_its_limit() -> None:
    tail = TaskTail(start=10, limit=3)
    assert await tail.next(0.01) == []
    for seq in (11, 12):
        tail.push(_recorded(seq))
    assert [item.seq for item in await tail.next(0.01)] == [11, 12]
    for seq in (13, 14, 15, 16):
        tail.push(_recorded(seq))
    assert tail.overflowed
    assert await tail.next(5) == [], "an overflowed tail answers at once, with nothing"
