"""``core.log.reader`` against a real nats-server: every answer a batched direct get can get (messages
then ``204 EOB`` with what is pending, ``404``, ``408``, ``503``, silence), the last message of a
filter, and the pull consumer of its own that a puller removes when closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from controlplane.embedded import EmbeddedNats
from core.domain.ids import new_id
from core.log.event_store import StoreError
from core.log.reader import LogReader, Puller

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.close()


@pytest.fixture
async def stream(nc: NATS) -> AsyncIterator[str]:
    """A stream of its own per test (subjects ``<stream>.>``, direct get allowed), removed afterwards."""
    name = f"r{new_id()[-12:]}"
    await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], allow_direct=True))
    yield name
    await nc.jetstream().delete_stream(name)


async def publish(nc: NATS, subject: str, count: int) -> list[int]:
    js = nc.jetstream()
    return [(await js.publish(subject, f"m{index}".encode())).seq for index in range(count)]


def seqs(messages: list[Msg]) -> list[int]:
    return [int(msg.headers["Nats-Sequence"]) for msg in messages]  # type: ignore[index]


async def test_a_read_goes_on_after_each_batch_until_nothing_is_pending(nc: NATS, stream: str) -> None:
    mine = await publish(nc, f"{stream}.a", 5)
    await publish(nc, f"{stream}.b", 2)  # not under the filter: skipped by the server, never sent
    reader = LogReader(nc, stream)
    told: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        told.append((done, total))

    async with aclosing(reader.batches(f"{stream}.a", batch=2, progress=progress)) as read:
        batches = [seqs(batch) async for batch in read]
    # Each batch ends with 204 EOB; its Nats-Num-Pending (3, 1, 0) says whether to ask again.
    assert batches == [mine[0:2], mine[2:4], mine[4:5]]
    assert told == [(2, 5), (4, 5), (5, 5)]
    assert seqs(await reader.read(f"{stream}.a", after_seq=mine[1])) == mine[2:]
    assert seqs(await reader.read(f"{stream}.>")) == list(range(1, 8))
    await reader.close()


async def test_a_batch_that_ends_exactly_at_the_last_message_asks_no_further(nc: NATS, stream: str) -> None:
    mine = await publish(nc, f"{stream}.a", 4)
    told: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        told.append((done, total))

    async with aclosing(LogReader(nc, stream).batches(f"{stream}.a", batch=2, progress=progress)) as read:
        assert [seqs(batch) async for batch in read] == [mine[0:2], mine[2:4]]
    assert told == [(2, 4), (4, 4)]  # the second 204 said nothing is pending: no third request


async def test_nothing_to_read_is_a_404_and_an_empty_read(nc: NATS, stream: str) -> None:
    mine = await publish(nc, f"{stream}.a", 2)
    reader = LogReader(nc, stream)
    assert await reader.read(f"{stream}.nothing") == []
    assert await reader.read(f"{stream}.a", after_seq=mine[-1]) == []  # starts past the end
    told: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        told.append((done, total))

    async with aclosing(reader.batches(f"{stream}.z", progress=progress)) as read:
        assert [batch async for batch in read] == []
    assert told == [(0, 0)]


async def test_a_request_the_server_cannot_read_is_a_408_error(nc: NATS, stream: str) -> None:
    await publish(nc, f"{stream}.a", 1)
    with pytest.raises(StoreError, match=f"reading {stream}.a failed: 408 Malformed Request"):
        await LogReader(nc, stream).read(f"{stream}.a", after_seq=-2)  # no such sequence as -1


async def test_a_stream_nobody_serves_is_a_503_error(nc: NATS) -> None:
    with pytest.raises(StoreError, match="nothing answers there"):
        await LogReader(nc, "NO_SUCH_STREAM").read("anything.>")
    with pytest.raises(StoreError, match="no stream NO_SUCH_STREAM"):
        await LogReader(nc, "NO_SUCH_STREAM").last("anything.>")


async def test_a_batch_may_take_long_but_not_go_silent(nc: NATS) -> None:
    """The timeout counts from the last reply: a slow server is waited for, a silent one is not."""
    stream = f"fake{new_id()[-8:]}"
    pause = {"slow": 0.15, "silent": 5.0}

    async def answer(request: Msg) -> None:
        subject = json.loads(request.data)["next_by_subj"]
        for seq in (1, 2):
            headers = {"Nats-Sequence": str(seq), "Nats-Subject": subject}
            await nc.publish(request.reply, b"{}", headers=headers)
            await asyncio.sleep(pause[subject])
        await nc.publish(request.reply, b"", headers={"Status": "204", "Nats-Num-Pending": "0"})

    served = await nc.subscribe(f"$JS.API.DIRECT.GET.{stream}", cb=answer)
    reader = LogReader(nc, stream, timeout=0.5)
    try:
        assert seqs(await reader.read("slow")) == [1, 2]
        with pytest.raises(StoreError, match="reading silent from the log timed out"):
            await reader.read("silent")
    finally:
        await served.unsubscribe()


async def test_leaving_early_drops_the_batch_asked_for_ahead(nc: NATS, stream: str) -> None:
    mine = await publish(nc, f"{stream}.a", 6)
    reader = LogReader(nc, stream)
    async with aclosing(reader.batches(f"{stream}.a", batch=2)) as read:
        async for batch in read:
            assert seqs(batch) == mine[:2]
            break
    assert seqs(await reader.read(f"{stream}.a")) == mine  # the reader goes on as if nothing was left
    await reader.close()


async def test_a_read_from_a_time(nc: NATS, stream: str) -> None:
    await publish(nc, f"{stream}.a", 2)
    await asyncio.sleep(0.01)
    since = datetime.now(UTC)
    later = await publish(nc, f"{stream}.a", 2)
    async with aclosing(LogReader(nc, stream).batches(f"{stream}.>", start_time=since)) as read:
        assert [seqs(batch) async for batch in read] == [later]


async def test_headers_arrive_as_stored(nc: NATS, stream: str) -> None:
    """Non-ASCII values and colons in values: what a header parser could lose (nats-py's email-based one
    dropped every header of such a message), read as the event store writes them."""
    headers = {"Cp-Actor": "élève ☃", "Cp-Correlation-Id": "a: b: c", "Nats-Msg-Id": "c1:0"}
    await nc.jetstream().publish(f"{stream}.a", b"{}", headers=headers)
    [msg] = await LogReader(nc, stream).read(f"{stream}.a")
    assert {name: msg.headers[name] for name in headers} == headers  # type: ignore[index]


async def test_the_last_message_of_a_filter(nc: NATS, stream: str) -> None:
    reader = LogReader(nc, stream)
    assert await reader.last(f"{stream}.>") is None  # 404
    [first] = await publish(nc, f"{stream}.a", 1)
    [second] = await publish(nc, f"{stream}.b", 1)
    last_a, last_any = await reader.last(f"{stream}.a"), await reader.last(f"{stream}.>")
    assert last_a is not None and seqs([last_a]) == [first]
    assert last_any is not None and seqs([last_any]) == [second]


async def test_a_puller_of_its_own_consumer_removes_it_when_closed(nc: NATS, stream: str) -> None:
    mine = await publish(nc, f"{stream}.a", 3)
    puller = await Puller.ephemeral(nc, stream, f"{stream}.a", start_seq=mine[1])
    assert puller.pending == 2
    assert [msg.metadata.sequence.stream for msg in await puller.fetch(10, 0.5)] == mine[1:]
    assert await puller.fetch(10, 0.1) == []  # the request expired with nothing: 408 (or 404)
    await puller.close()
    with pytest.raises(NotFoundError):
        await nc.jetstream().consumer_info(stream, puller.consumer)


async def test_a_pull_from_a_consumer_that_went_away_fails(nc: NATS, stream: str) -> None:
    puller = await Puller.ephemeral(nc, stream, f"{stream}.>")
    await nc.jetstream().delete_consumer(stream, puller.consumer)
    with pytest.raises(RuntimeError, match="nothing answers there"):
        await puller.fetch(10, 0.5)
    await puller.close()


async def test_a_standing_request_pushes_what_is_stored_later_and_take_hands_it_out_without_asking(
    nc: NATS, stream: str
) -> None:
    puller = await Puller.ephemeral(nc, stream, f"{stream}.a")
    try:
        assert await puller.fetch(10, 0.1) == []  # nothing yet: the request stays open on the server
        first = await publish(nc, f"{stream}.a", 1)
        assert [msg.metadata.sequence.stream for msg in await puller.fetch(10, 2.0)] == first
        later = await publish(nc, f"{stream}.a", 3)
        taken: list[int] = []
        async with asyncio.timeout(5):
            while len(taken) < 3:  # pushed under the same request: no fetch in between
                taken += [msg.metadata.sequence.stream for msg in puller.take(10)]
                await asyncio.sleep(0.01)
        assert taken == later
    finally:
        await puller.close()


async def test_a_close_cancelled_midway_leaves_the_connection_answering_requests(nc: NATS, stream: str) -> None:
    # An SSE response cancelled with its client closes its puller while being cancelled: a NATS flush
    # cancelled mid-way used to leave the connection's read loop failing on the late PONG, and every
    # JetStream reply on that connection was lost for tens of seconds.
    for _ in range(5):
        puller = await Puller.ephemeral(nc, stream, f"{stream}.>", start_seq=1)
        await puller.fetch(1, 0.01)
        closing = asyncio.create_task(puller.close())
        for _ in range(3):  # into the flush, waiting for its PONG
            await asyncio.sleep(0)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
    await asyncio.sleep(0.2)
    for _ in range(3):
        assert (await nc.jetstream().stream_info(stream)).config.name == stream
