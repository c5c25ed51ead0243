"""Issue 14, finding 5: the gateway accepts only bodies that every reader of the log can load back.
Arrays and objects may nest 64 deep (``Limits.max_json_depth``); deeper is a 422 that appends nothing.
Before, ~975 deep was stored but could not be decoded by another gateway, and 976 deep was a 503."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from gateway.http import json_depth
from tests.gateway.conftest import Stack, own_stack

pytestmark = pytest.mark.integration

LIMIT = 64


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    async with own_stack(tmp_path_factory.mktemp("edge-depth"), database_url) as served:
        yield served


def submit_nested(depth: int, kind: str = "list") -> bytes:
    """A submit whose body nests ``depth`` deep: the body object itself is one level."""
    inner = depth - 1
    payload = b"[" * inner + b"]" * inner if kind == "list" else b'{"a":' * inner + b"1" + b"}" * inner
    return b'{"type": "deep", "queue": "deep", "payload": ' + payload + b"}"


@pytest.mark.parametrize("depth", [LIMIT + 1, 100, 974, 975, 976, 977, 5_000, 100_000])
@pytest.mark.parametrize("kind", ["list", "dict"])
async def test_a_body_nested_deeper_than_the_limit_is_a_422_and_appends_nothing(
    stack: Stack, depth: int, kind: str
) -> None:
    before = await stack.services.store.last_seq()
    async with stack.client() as c:
        r = await c.post("/v1/tasks", content=submit_nested(depth, kind), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json")
    assert f"more than {LIMIT} deep" in r.json()["detail"]
    assert await stack.services.store.last_seq() == before


async def test_the_deepest_body_accepted_loads_back_on_another_gateway(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post(
            "/v1/tasks", content=submit_nested(LIMIT, "dict"), headers={"Content-Type": "application/json"}
        )
    assert r.status_code == 201, r.text[:500]
    task_id = r.json()["id"]
    other = await JetStreamEventStore.connect(stack.services.store.nc.connected_url.geturl())  # type: ignore[union-attr]
    try:
        task, _ = await CommandHandler(other).load("acme", "task", task_id)
    finally:
        await other.close()
    assert task is not None
    levels, payload = 0, task.payload
    while isinstance(payload, dict):
        levels, payload = levels + 1, payload["a"]
    assert levels == LIMIT - 1  # the payload sits one level inside the body


def test_depth_is_measured_outside_strings_and_without_recursion() -> None:
    assert json_depth(b"1") == 0
    assert json_depth(b'{"a": [1, {"b": "[[[{{{"}], "c": "\\"[["}') == 3
    assert json_depth(b'["\\\\", ["x"]]') == 2  # an escaped backslash ends before the quote
    assert json_depth(b"[" * 1_000_000) == 1_000_000
