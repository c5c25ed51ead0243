"""The console's HTTP rules without a browser: sign-in throttling, JWT sessions that end with the
token, the cookie never writes through the API, and fragments that leave when their thing is done."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest

from gateway.services import RateLimiter
from tests.gateway.conftest import HS256_SECRET, JWT_SCOPE, Stack
from tests.gateway.test_api import claim, queue, submit

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def sign_in(stack: Stack, credential: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client (cookies kept) signed in with ``credential``; fails if refused."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as http:
        answer = await try_sign_in(http, credential)
        assert answer.status_code == 303, answer.text
        yield http


async def try_sign_in(http: httpx.AsyncClient, credential: str) -> httpx.Response:
    form = await http.get("/console")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token, form.text
    return await http.post("/console/sign-in", data={"csrf": token.group(1), "key": credential})


async def csrf(http: httpx.AsyncClient) -> str:
    page = await http.get("/console/approvals")
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


async def test_failed_sign_ins_from_one_address_are_throttled(stack: Stack) -> None:
    original = stack.services.failed_auth
    stack.services.failed_auth = RateLimiter(rate=0.01, burst=2)
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=20) as http:
            codes = [(await try_sign_in(http, "cp_wrong.key")).status_code for _ in range(3)]
            assert codes == [401, 401, 429]
            # While throttled, even the right key waits: guessing would otherwise go on at full speed.
            assert (await try_sign_in(http, stack.keys["acme"]["viewer"])).status_code == 429
    finally:
        stack.services.failed_auth = original
    async with sign_in(stack, stack.keys["acme"]["viewer"]) as http:
        assert (await http.get("/console/tasks")).status_code == 200


async def test_a_jwt_session_ends_when_the_token_expires(stack: Stack) -> None:
    token = jwt.encode(
        {"sub": "alice", "org": "acme", "roles": ["approver"], "exp": int(time.time()) + 2, **JWT_SCOPE},
        HS256_SECRET,
        algorithm="HS256",
    )
    async with sign_in(stack, token) as http:
        page = await http.get("/console/approvals")
        assert page.status_code == 200
        assert "jwt:alice" in page.text
        deadline = time.monotonic() + 10
        while (await http.get("/console/approvals")).status_code == 200:
            assert time.monotonic() < deadline, "the session outlived its JWT"
            await asyncio.sleep(0.2)
        assert (await http.get("/console/approvals")).headers["location"].startswith("/console?next=")


async def test_the_session_cookie_reads_the_api_but_never_writes_through_it(stack: Stack) -> None:
    async with sign_in(stack, stack.keys["acme"]["admin"]) as http:
        assert (await http.get("/v1/tasks")).status_code == 200
        refused = await http.post("/v1/tasks", json={"type": "deploy"}, headers={"X-CSRF-Token": await csrf(http)})
        assert refused.status_code == 401, refused.text


async def test_an_approval_row_leaves_once_decided_and_the_decision_is_the_apis(stack: Stack) -> None:
    q = queue()
    async with stack.client(role="admin") as api:
        task = await submit(api, q)
        claimed = await claim(api, q)
        assert claimed is not None
        asked = await api.post(
            f"/v1/tasks/{task['id']}/approval-requests",
            json={
                "worker_id": "w1",
                "lease_id": claimed["lease"]["id"],
                "reason": "ship it?",
                "details": {"diff": "-old\n+new"},
                "form": {
                    "type": "object",
                    "properties": {"window": {"type": "string", "enum": ["now", "tonight"]}},
                    "required": ["window"],
                },
            },
        )
        assert asked.status_code == 201, asked.text
    approval_id = asked.json()["id"]
    async with sign_in(stack, stack.keys["acme"]["approver"]) as http:
        row = await http.get(f"/console/approvals/{approval_id}/row")
        assert row.status_code == 200
        assert 'class="add">+new' in row.text  # a diff is shown as one
        assert re.search(r"<option\s*>tonight</option>", row.text)
        token = await csrf(http)
        url = f"/console/approvals/{approval_id}/approve"
        json_answer = {"Accept": "application/json"}
        unfit = await http.post(url, data={"csrf": token, "response.window": "someday"}, headers=json_answer)
        assert unfit.status_code == 422, unfit.text
        decided = await http.post(
            url, data={"csrf": token, "response.window": "tonight", "idempotency_key": "k1"}, headers=json_answer
        )
        assert decided.status_code == 200, decided.text
        again = await http.post(
            url, data={"csrf": token, "response.window": "tonight", "idempotency_key": "k1"}, headers=json_answer
        )
        assert again.status_code == 200, again.text  # the same form twice: one vote
        assert (await http.get(f"/console/approvals/{approval_id}/row")).status_code == 204
    async with stack.client(role="viewer") as api:
        approval = (await api.get(f"/v1/approvals/{approval_id}")).json()
    assert approval["status"] == "approved"
    assert [(d["decision"], d["response"]) for d in approval["decisions"]] == [("approve", {"window": "tonight"})]
