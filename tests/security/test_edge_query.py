"""Issue 14, finding 6: a bad query value is a 422 (a bad path id a 404), never a 5xx, and never reaches
PostgreSQL or NATS. Every query string is read by one typed parser (gateway/queries.py): numbers are
ASCII and bounded (a sequence at most 2**63-1), ids are tokens, nothing may hold NUL, nothing may be
given twice. Before, ``str.isdigit()`` let "²" and 5,000-digit numbers through to ``int()`` (503), NUL
reached PostgreSQL, and ``after=10**20`` dropped the SSE connection."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from tests.gateway.conftest import Stack, own_stack

pytestmark = pytest.mark.integration

MAX_SEQ = 2**63 - 1
SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() says True; int() says no
ARABIC_THREE = "\u0663"  # int() takes it
HUGE = "9" * 5_000  # int() refuses more than 4,300 digits


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    async with own_stack(tmp_path_factory.mktemp("edge-query"), database_url) as served:
        yield served


@pytest.fixture(scope="module")
async def task_id(stack: Stack) -> str:
    async with stack.client() as c:
        r = await c.post("/v1/tasks", json={"type": "edge", "queue": "edge"})
    assert r.status_code == 201, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def cursor(*position: object) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


async def answer(
    stack: Stack, path: str, params: list[tuple[str, str]] | None = None, headers: dict[str, bytes] | None = None
) -> httpx.Response:
    """The response to a GET; for an event stream that opens, its headers and first message."""
    async with stack.client(role="viewer") as c, c.stream("GET", path, params=params, headers=headers) as r:
        if r.status_code == 200 and path.endswith("/events"):
            first = await anext(r.aiter_bytes())
            return httpx.Response(200, headers=r.headers, content=first)
        await r.aread()
        return r


BAD_QUERIES: list[tuple[str, list[tuple[str, str]]]] = [
    ("/v1/tasks", [("min_seq", SUPERSCRIPT_TWO)]),
    ("/v1/tasks", [("min_seq", HUGE)]),
    ("/v1/tasks", [("min_seq", "-1")]),
    ("/v1/tasks", [("min_seq", str(MAX_SEQ + 1))]),
    ("/v1/tasks", [("limit", SUPERSCRIPT_TWO)]),
    ("/v1/tasks", [("limit", ARABIC_THREE)]),
    ("/v1/tasks", [("limit", HUGE)]),
    ("/v1/tasks", [("limit", "0")]),
    ("/v1/tasks", [("limit", "501")]),
    ("/v1/tasks", [("limit", " 5")]),
    ("/v1/tasks", [("limit", "5.0")]),
    ("/v1/tasks", [("limit", "1e2")]),
    ("/v1/tasks", [("limit", "+5")]),
    ("/v1/tasks", [("limit", "5"), ("limit", "6")]),
    ("/v1/tasks", [("queue", "q\x00")]),
    ("/v1/tasks", [("queue", "q\n")]),
    ("/v1/tasks", [("queue", "Q")]),
    ("/v1/tasks", [("status", "pending\n")]),
    ("/v1/tasks", [("status", "pending"), ("status", "running")]),
    ("/v1/tasks", [("priority", "\x00")]),
    ("/v1/tasks", [("workflow", "deploy\x00")]),
    ("/v1/tasks", [("workflow", "w" * 257)]),
    ("/v1/tasks", [("cursor", "\x00")]),
    ("/v1/tasks", [("cursor", "not base64!")]),
    ("/v1/tasks", [("cursor", "A" * 513)]),
    ("/v1/tasks", [("cursor", cursor("2025-01-01T00:00:00Z", "a\x00b"))]),
    ("/v1/tasks", [("cursor", cursor("2025-01-01T00:00:00", "a"))]),  # no time zone
    ("/v1/tasks", [("cursor", cursor("0001-01-01T00:00:00+01:00", "a"))]),  # before year 1 in UTC
    ("/v1/tasks", [("cursor", cursor("2025-01-01T00:00:00Z", "x" * 100))]),
    ("/v1/approvals", [("task_id", "\x00")]),
    ("/v1/approvals", [("task_id", "t\n")]),
    ("/v1/approvals", [("limit", HUGE)]),
    ("/v1/approvals", [("cursor", cursor("2025-01-01T00:00:00Z", "\x00"))]),
    ("/v1/approvals", [("min_seq", SUPERSCRIPT_TWO)]),
    ("/v1/workers", [("capability", "gpu\x00")]),
    ("/v1/workers", [("capability", "c" * 129)]),
    ("/v1/workers", [("queue", "\x00")]),
    ("/v1/workers", [("available", "yes")]),
    ("/v1/workers", [("min_seq", HUGE)]),
    ("/v1/usage", [("min_seq", SUPERSCRIPT_TWO)]),
    ("/v1/usage", [("queue", "q\x00")]),
    ("/v1/events", [("after", str(10**20))]),
    ("/v1/events", [("after", SUPERSCRIPT_TWO)]),
    ("/v1/events", [("after", HUGE)]),
    ("/v1/events", [("after", "1"), ("after", "2")]),
    ("/v1/events", [("queue", "q\x00")]),
    ("/v1/events", [("types", "TaskSubmitted\x00")]),
    ("/v1/events", [("types", "NoSuchEvent")]),
    ("/v1/tasks/{task_id}/events", [("after", str(10**20))]),
    ("/v1/tasks/{task_id}/events", [("after", SUPERSCRIPT_TWO)]),
]


@pytest.mark.parametrize(("path", "params"), BAD_QUERIES)
async def test_a_bad_query_value_is_a_422_saying_which(
    stack: Stack, task_id: str, path: str, params: list[tuple[str, str]]
) -> None:
    r = await answer(stack, path.format(task_id=task_id), params)
    assert r.status_code == 422, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json")
    detail = r.json()["detail"]
    assert params[0][0] in detail or "cursor" in detail or "types" in detail, detail


@pytest.mark.parametrize(
    "value", [str(10**20), str(MAX_SEQ + 1), SUPERSCRIPT_TWO, HUGE, "-1", "1e3", "1.0", "+1", "1, 2", "abc"]
)
@pytest.mark.parametrize("path", ["/v1/events", "/v1/tasks/{task_id}/events"])
async def test_a_bad_last_event_id_is_a_422(stack: Stack, task_id: str, path: str, value: str) -> None:
    r = await answer(stack, path.format(task_id=task_id), headers={"Last-Event-ID": value.encode()})
    assert r.status_code == 422, r.text[:500]
    assert "Last-Event-ID" in r.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/policy-bundles/{SUPERSCRIPT_TWO}",
        f"/v1/policy-bundles/{HUGE}",
        f"/v1/policy-bundles/{MAX_SEQ + 1}",
        "/v1/policy-bundles/1%00",
        "/v1/tasks/t%00",
        "/v1/tasks/t%0A",
        "/v1/tasks/t%00/events",
        "/v1/workers/w%00",
        "/v1/approvals/t%00-1",
    ],
)
async def test_a_bad_path_id_names_nothing(stack: Stack, path: str) -> None:
    r = await answer(stack, path)
    assert r.status_code == 404, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_a_min_seq_beyond_the_log_is_a_422_at_once(stack: Stack) -> None:
    last = await stack.services.store.last_seq()
    for value in (str(MAX_SEQ), str(last + 1_000_000)):
        started = time.monotonic()
        r = await answer(stack, "/v1/tasks", [("min_seq", value)])
        assert r.status_code == 422, r.text
        assert "beyond the log" in r.json()["detail"]
        assert time.monotonic() - started < 2, "nothing to wait for"
    assert (await answer(stack, "/v1/tasks", [("min_seq", str(last))])).status_code == 200


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/tasks", [("limit", "500"), ("queue", ""), ("status", ""), ("cursor", "")]),
        ("/v1/tasks", [("limit", "1"), ("unknown", "\x00"), ("unknown", "twice")]),
        ("/v1/approvals", [("status", "pending"), ("limit", "1")]),
        ("/v1/workers", [("available", "true"), ("capability", "gpu"), ("min_seq", "0")]),
        ("/v1/events", [("after", str(MAX_SEQ)), ("types", "TaskSubmitted, TaskClaimed")]),
        ("/v1/events", [("after", "")]),
        ("/v1/tasks/{task_id}/events", [("after", "0")]),
    ],
)
async def test_good_and_empty_values_still_work(
    stack: Stack, task_id: str, path: str, params: list[tuple[str, str]]
) -> None:
    r = await answer(stack, path.format(task_id=task_id), params)
    assert r.status_code == 200, r.text[:500]


async def test_a_next_cursor_still_pages(stack: Stack) -> None:
    async with stack.client() as c:
        for _ in range(3):
            submitted = await c.post("/v1/tasks", json={"type": "page", "queue": "paged"})
            assert submitted.status_code == 201, submitted.text
        seen: list[str] = []
        params: dict[str, str] = {"queue": "paged", "limit": "1", "min_seq": str(submitted.json()["seq"])}
        while True:
            page = (await c.get("/v1/tasks", params=params)).json()
            seen += [item["id"] for item in page["items"]]
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 3
