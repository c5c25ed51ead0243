"""Issue 14, finding 9: each SSE stream holds a JetStream consumer that may replay the org's whole
history, so a credential may hold only ``Limits.sse_max_per_credential`` streams (16) and an org
``sse_max_per_org`` (256); one more is a 429 problem+json. A stream gives its slot back when it ends or
its client goes away. Before, one viewer key held 64 streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.services import Limits, StreamSlots
from tests.gateway.conftest import Stack, own_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    async with own_stack(tmp_path_factory.mktemp("edge-streams"), database_url) as served:
        yield served


@pytest.fixture(scope="module")
async def task_id(stack: Stack) -> str:
    async with stack.client() as c:
        r = await c.post("/v1/tasks", json={"type": "streamed", "queue": "streams"})
    assert r.status_code == 201, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def key_id(stack: Stack, org: str, role: str) -> str:
    return stack.keys[org][role].split("_")[1]


async def opened(streams: contextlib.AsyncExitStack, client: httpx.AsyncClient, path: str) -> httpx.Response:
    """A stream that stays open until ``streams`` closes; its status, and for 200 its first message read."""
    response = await streams.enter_async_context(client.stream("GET", path))
    if response.status_code == 200:
        chunks = response.aiter_bytes()
        streams.push_async_callback(chunks.aclose)  # also keeps it: collected, it would close the stream
        assert (await anext(chunks)).startswith(b": connected")
    else:
        await response.aread()
    return response


async def until_open(slots: StreamSlots, org: str, credential: str, expected: tuple[int, int]) -> None:
    async with asyncio.timeout(10):
        while slots.open_for(org, credential) != expected:
            await asyncio.sleep(0.02)


def test_the_defaults_leave_the_console_room_and_bound_an_org() -> None:
    assert (Limits().sse_max_per_credential, Limits().sse_max_per_org) == (16, 256)


async def test_a_credential_and_an_org_hold_only_so_many_streams(
    stack: Stack, task_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = StreamSlots(per_credential=3, per_org=5)
    monkeypatch.setattr(stack.services, "streams", slots)
    viewer, approver = key_id(stack, "acme", "viewer"), key_id(stack, "acme", "approver")
    async with (
        contextlib.AsyncExitStack() as streams,
        stack.client("acme", "viewer") as as_viewer,
        stack.client("acme", "approver") as as_approver,
        stack.client("globex", "viewer") as as_other_org,
    ):
        for path in ("/v1/events", "/v1/events?types=TaskSubmitted", f"/v1/tasks/{task_id}/events"):
            assert (await opened(streams, as_viewer, path)).status_code == 200
        assert slots.open_for("acme", viewer) == (3, 3)
        for path in ("/v1/events", f"/v1/tasks/{task_id}/events"):
            refused = await as_viewer.get(path)
            assert refused.status_code == 429, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert int(refused.headers["retry-after"]) >= 1
            assert "credential" in refused.json()["detail"]

        for _ in range(2):  # the org's other credentials share what is left of its five
            assert (await opened(streams, as_approver, "/v1/events")).status_code == 200
        refused = await as_approver.get("/v1/events")
        assert refused.status_code == 429, refused.text
        assert "org" in refused.json()["detail"]
        assert slots.open_for("acme", approver) == (2, 5)

        assert (await opened(streams, as_other_org, "/v1/events")).status_code == 200  # another org's own
        # A stream refused for another reason takes no slot.
        assert (await as_other_org.get("/v1/events?after=-1")).status_code == 422
        assert (await as_other_org.get("/v1/tasks/no-such-task/events")).status_code == 404
        assert slots.open_for("globex", key_id(stack, "globex", "viewer")) == (1, 1)

    await until_open(slots, "acme", viewer, (0, 0))
    await until_open(slots, "globex", key_id(stack, "globex", "viewer"), (0, 0))


async def test_a_stream_gives_its_slot_back_when_its_client_goes_away(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = StreamSlots(per_credential=2, per_org=2)
    monkeypatch.setattr(stack.services, "streams", slots)
    viewer = key_id(stack, "acme", "viewer")
    async with stack.client("acme", "viewer") as as_viewer:
        for _ in range(10):  # five times the cap, one after another
            async with contextlib.AsyncExitStack() as streams:
                assert (await opened(streams, as_viewer, "/v1/events")).status_code == 200
                assert slots.open_for("acme", viewer) == (1, 1)
            await until_open(slots, "acme", viewer, (0, 0))
