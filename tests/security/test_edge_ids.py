"""Issue 14, finding 7: an id or a role followed by a newline (``"q\\n"``, ``"admin\\n"``) is refused like
any other value that is not one: msgspec checks patterns with search semantics, where ``$`` matches
before a final newline, so every pattern is now anchored at the very end (core.domain.ids.whole). The
property tests of the patterns themselves are in tests/unit/test_ids.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.gateway.conftest import Stack, own_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    async with own_stack(tmp_path_factory.mktemp("edge-ids"), database_url) as served:
        yield served


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/tasks", {"type": "x", "queue": "q\n"}, "queue"),
        ("/v1/tasks", {"type": "x", "queue": "q\r\n"}, "queue"),
        ("/v1/api-keys", {"name": "k", "roles": ["admin\n"]}, "roles"),
        ("/v1/api-keys", {"name": "k", "roles": ["viewer", "viewer\n"]}, "roles"),
        ("/v1/workers", {"worker_id": "w\n"}, "worker_id"),
        ("/v1/workers", {"worker_id": "w", "queue": "default\n"}, "queue"),
        ("/v1/tasks/claim", {"worker_id": "w\n"}, "worker_id"),
        ("/v1/workers/w/heartbeat", {"status": "ready\n"}, "status"),
    ],
)
async def test_an_id_or_role_with_a_newline_after_it_is_a_422_and_appends_nothing(
    stack: Stack, path: str, body: dict[str, Any], field: str
) -> None:
    before = await stack.services.store.last_seq()
    async with stack.client() as c:
        r = await c.post(path, json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]
    assert await stack.services.store.last_seq() == before


async def test_a_path_id_with_a_newline_after_it_names_nothing(stack: Stack) -> None:
    async with stack.client() as c:
        task = (await c.post("/v1/tasks", json={"type": "x", "queue": "nl"})).json()
        assert (await c.get(f"/v1/tasks/{task['id']}")).status_code == 200
        before = await stack.services.store.last_seq()
        assert (await c.get(f"/v1/tasks/{task['id']}%0A")).status_code == 404
        assert (await c.post(f"/v1/tasks/{task['id']}%0A/cancel")).status_code == 404
    assert await stack.services.store.last_seq() == before
