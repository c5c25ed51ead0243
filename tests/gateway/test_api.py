"""The public contract of docs/api.md, through real HTTP against the whole stack."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import pytest

from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.subjects import org_events_filter
from gateway.services import RateLimiter
from tests.gateway.conftest import HS256_SECRET, JWT_SCOPE, Stack

pytestmark = pytest.mark.integration


def queue() -> str:
    return f"q{new_id()[-10:]}"


async def submit(c: httpx.AsyncClient, q: str, **fields: Any) -> dict[str, Any]:
    r = await c.post("/v1/tasks", json={"type": "deploy", "payload": {"env": "prod"}, "queue": q, **fields})
    assert r.status_code == 201, r.text
    return r.json()


async def claim(c: httpx.AsyncClient, q: str, worker: str = "w1", **fields: Any) -> dict[str, Any] | None:
    r = await c.post("/v1/tasks/claim", json={"worker_id": worker, "queue": q, **fields})
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else None


async def last_seq(stack: Stack) -> int:
    return await stack.services.store.last_seq()


async def appended_since(stack: Stack, seq: int, org: str = "acme") -> list[RecordedEvent]:
    """What requests appended to ``org``'s subjects after ``seq``. The stream's last sequence cannot tell:
    timers that other tests armed fire on the same stream, some on acme's subjects, at any moment; their
    events and the system's reactions to them carry ``system:`` actors and are left out."""
    events = await stack.services.store.read_subject(org_events_filter(org), after_seq=seq)
    return [recorded for recorded in events if not (recorded.actor or "").startswith("system:")]


async def into_environment(stack: Stack, name: str, q: str) -> None:
    """Add queue ``q`` to acme's environment ``name`` (created if need be)."""
    async with stack.client() as admin:
        current = await admin.get(f"/v1/environments/{name}")
        held = current.json()["queues"] if current.status_code == 200 else []
        r = await admin.put(f"/v1/environments/{name}", json={"queues": [*held, q]})
        assert r.status_code == 200, r.text


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


async def test_submit_then_get_shows_the_write_and_lists_catch_up(stack: Stack) -> None:
    q = queue()
    async with stack.client(role="submitter") as c:
        task = await submit(c, q, priority="high", required_capabilities=["gpu"], metadata={"team": "sre"})
        assert task["status"] == "pending"
        assert task["org"] == "acme"
        assert task["type"] == "deploy"
        assert task["seq"] > 0
        got = (await c.get(f"/v1/tasks/{task['id']}")).json()
        assert got["id"] == task["id"]
        assert got["priority"] == "high"
        assert got["required_capabilities"] == ["gpu"]
        listed = (await c.get("/v1/tasks", params={"queue": q, "min_seq": task["seq"]})).json()
        assert [t["id"] for t in listed["items"]] == [task["id"]]
        assert listed["next_cursor"] is None


async def test_list_pages_with_a_cursor(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        ids = [(await submit(c, q))["id"] for _ in range(5)]
        seen, cursor = [], None
        while True:
            params = {"queue": q, "limit": 2, "min_seq": await last_seq(stack)}
            if cursor:
                params["cursor"] = cursor
            page = (await c.get("/v1/tasks", params=params)).json()
            seen += [t["id"] for t in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == ids
        problem(await c.get("/v1/tasks", params={"limit": 501}), 422)
        problem(await c.get("/v1/tasks", params={"status": "sleeping"}), 422)
        problem(await c.get("/v1/tasks", params={"cursor": "not-a-cursor"}), 422)


async def test_bad_input_gets_a_clear_error_and_appends_nothing(stack: Stack) -> None:
    before = await last_seq(stack)
    async with stack.client(role="submitter") as c:
        problem(await c.post("/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}), 400)
        problem(await c.post("/v1/tasks", content=b"[1,2]", headers={"content-type": "application/json"}), 400)
        problem(await c.post("/v1/tasks", content=b""), 400)
        problem(await c.post("/v1/tasks", json={"payload": {}}), 422)
        problem(await c.post("/v1/tasks", json={"type": "x", "priority": "urgent"}), 422)
        problem(await c.post("/v1/tasks", json={"type": "x", "queue": "no.dots>"}), 422)
        problem(await c.post("/v1/tasks", json={"type": "x", "max_retries": -1}), 422)
        problem(await c.post("/v1/tasks", json={"type": "x", "timeout_seconds": 0}), 422)
        problem(await c.post("/v1/tasks", json={"type": "x", "payload": "y" * (1024 * 1024 + 10)}), 413)
        problem(await c.post("/v1/tasks", content=b"type=x", headers={"content-type": "text/plain"}), 415)
        problem(await c.get("/v1/tasks/NOT..A.TOKEN"), 404)
        problem(await c.get(f"/v1/tasks/{new_id()}"), 404)
        problem(await c.post(f"/v1/tasks/{new_id()}/cancel"), 404)
        problem(await c.delete("/v1/tasks"), 405)
    assert await appended_since(stack, before) == []


async def test_credentials_and_roles(stack: Stack) -> None:
    q = queue()
    async with httpx.AsyncClient(base_url=stack.url) as anonymous:
        problem(await anonymous.get("/v1/tasks"), 401)
        problem(await anonymous.get("/v1/tasks", headers={"Authorization": "Bearer cp_nope_nope"}), 401)
        problem(await anonymous.get("/v1/tasks", headers={"Authorization": "Basic dXNlcg=="}), 401)
    async with stack.client(role="viewer") as viewer:
        problem(await viewer.post("/v1/tasks", json={"type": "x", "queue": q}), 403)
        assert (await viewer.get("/v1/tasks", params={"queue": q})).status_code == 200
    async with stack.client(role="worker") as worker:
        problem(await worker.post("/v1/tasks", json={"type": "x", "queue": q}), 403)
        problem(await worker.post("/v1/api-keys", json={"name": "k", "roles": ["admin"]}), 403)
    async with stack.client(role="approver") as approver:
        problem(await approver.post("/v1/tasks/claim", json={"worker_id": "w1", "queue": q}), 403)


async def test_other_orgs_objects_are_not_found(stack: Stack) -> None:
    q = queue()
    async with stack.client() as acme, stack.client("globex") as globex:
        task = await submit(acme, q)
        leased = await claim(acme, q)
        assert leased is not None
        lease = {"worker_id": "w1", "lease_id": leased["lease"]["id"]}
        approval = (await acme.post(f"/v1/tasks/{task['id']}/approval-requests", json={**lease, "reason": "r"})).json()
        problem(await globex.get(f"/v1/tasks/{task['id']}"), 404)
        problem(await globex.post(f"/v1/tasks/{task['id']}/cancel"), 404)
        problem(await globex.get(f"/v1/approvals/{approval['id']}"), 404)
        problem(await globex.post(f"/v1/approvals/{approval['id']}/approve"), 404)
        assert await claim(globex, q) is None
        listed = (await globex.get("/v1/approvals", params={"task_id": task["id"]})).json()
        assert listed["items"] == []


async def test_claim_takes_highest_priority_then_oldest_with_matching_capabilities(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        low = await submit(c, q, priority="low")
        normal_old = await submit(c, q)
        needs_gpu = await submit(c, q, priority="critical", required_capabilities=["gpu"])
        normal_new = await submit(c, q)
        high = await submit(c, q, priority="high")
        order = []
        while (got := await claim(c, q, capabilities=["python"])) is not None:
            order.append(got["task"]["id"])
        assert order == [high["id"], normal_old["id"], normal_new["id"], low["id"]]
        gpu = await claim(c, q, worker="w2", capabilities=["gpu", "python"])
        assert gpu is not None
        assert gpu["task"]["id"] == needs_gpu["id"]
        assert gpu["task"]["status"] == "running"
        assert gpu["task"]["assigned_worker"] == "w2"


async def test_claim_long_poll_wakes_when_a_task_arrives(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        started = time.monotonic()
        waiting = asyncio.create_task(claim(c, q, block_ms=10_000))
        await asyncio.sleep(0.5)
        task = await submit(c, q)
        got = await waiting
        assert got is not None
        assert got["task"]["id"] == task["id"]
        assert time.monotonic() - started < 3
        started = time.monotonic()
        assert await claim(c, q, block_ms=300) is None
        assert 0.25 < time.monotonic() - started < 3


async def test_heartbeat_renews_and_a_lost_lease_is_409(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        task = await submit(c, q)
        leased = await claim(c, q, lease_seconds=5)
        assert leased is not None
        lease_id = leased["lease"]["id"]
        r = await c.post(
            f"/v1/tasks/{task['id']}/heartbeat",
            json={"worker_id": "w1", "lease_id": lease_id, "lease_seconds": 60, "progress": {"pct": 40}},
        )
        assert r.status_code == 200
        assert r.json()["lease"]["expires_at"] > leased["lease"]["expires_at"]
        problem(await c.post(f"/v1/tasks/{task['id']}/heartbeat", json={"worker_id": "w1", "lease_id": "other"}), 409)
        problem(await c.post(f"/v1/tasks/{task['id']}/complete", json={"worker_id": "w9", "lease_id": lease_id}), 409)
        assert (await c.get(f"/v1/tasks/{task['id']}")).json()["progress"] == {"pct": 40}


async def test_human_in_the_loop_with_quorum_and_the_requester_cannot_decide(stack: Stack) -> None:
    q = queue()
    async with stack.client() as admin, stack.client(role="approver") as approver:
        issued = (await admin.post("/v1/api-keys", json={"name": "second approver", "roles": ["approver"]})).json()
        both = (
            await admin.post("/v1/api-keys", json={"name": "worker+approver", "roles": ["worker", "approver"]})
        ).json()
        task = await submit(admin, q)
        async with (
            stack.client(role="worker") as _,
            httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {both['key']}"}) as requester,
            httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {issued['key']}"}) as second,
        ):
            await stack.services.read_model.wait_for("access", issued["seq"], 5)
            await stack.services.read_model.wait_for("access", both["seq"], 5)
            leased = await claim(requester, q)
            assert leased is not None
            r = await requester.post(
                f"/v1/tasks/{task['id']}/approval-requests",
                json={"worker_id": "w1", "lease_id": leased["lease"]["id"], "reason": "deploy to prod", "quorum": 2},
            )
            assert r.status_code == 201, r.text
            approval = r.json()
            assert approval["status"] == "pending"
            assert approval["quorum"] == 2
            state = (await admin.get(f"/v1/tasks/{task['id']}")).json()
            assert state["status"] == "awaiting_approval"
            assert state["lease"] is None
            inbox = await approver.get("/v1/approvals", params={"status": "pending", "min_seq": approval["seq"]})
            assert approval["id"] in [a["id"] for a in inbox.json()["items"]]
            problem(await requester.post(f"/v1/approvals/{approval['id']}/approve"), 403)
            first = await approver.post(f"/v1/approvals/{approval['id']}/approve", json={"comment": "lgtm"})
            assert first.json()["status"] == "pending"
            problem(await approver.post(f"/v1/approvals/{approval['id']}/approve"), 409)
            done = (await second.post(f"/v1/approvals/{approval['id']}/approve")).json()
            assert done["status"] == "approved"
            assert [d["decision"] for d in done["decisions"]] == ["approve", "approve"]
            problem(await second.post(f"/v1/approvals/{approval['id']}/reject", json={"reason": "late"}), 409)
            back = (await admin.get(f"/v1/tasks/{task['id']}")).json()
            assert back["status"] == "pending"
            assert back["approvals"][0]["status"] == "approved"
            again = await claim(admin, q, worker="w2")
            assert again is not None
            finished = await admin.post(
                f"/v1/tasks/{task['id']}/complete",
                json={"worker_id": "w2", "lease_id": again["lease"]["id"], "result": {"ok": 1}},
            )
            assert finished.json()["status"] == "completed"
            assert finished.json()["result"] == {"ok": 1}


async def test_one_rejection_rejects(stack: Stack) -> None:
    q = queue()
    async with stack.client() as admin, stack.client(role="approver") as approver:
        task = await submit(admin, q)
        leased = await claim(admin, q)
        assert leased is not None
        approval = (
            await admin.post(
                f"/v1/tasks/{task['id']}/approval-requests",
                json={"worker_id": "w1", "lease_id": leased["lease"]["id"], "reason": "spend", "quorum": 3},
            )
        ).json()
        problem(await approver.post(f"/v1/approvals/{approval['id']}/reject", json={}), 422)
        rejected = (await approver.post(f"/v1/approvals/{approval['id']}/reject", json={"reason": "too costly"})).json()
        assert rejected["status"] == "rejected"
        assert rejected["decisions"][0]["comment"] == "too costly"
        assert (await admin.get(f"/v1/approvals/{approval['id']}")).json()["status"] == "rejected"


async def test_retryable_failure_backs_off_then_exhausts(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        task = await submit(c, q, max_retries=1, retry_backoff_seconds=0.5)
        leased = await claim(c, q)
        assert leased is not None
        r = await c.post(
            f"/v1/tasks/{task['id']}/fail",
            json={"worker_id": "w1", "lease_id": leased["lease"]["id"], "error": {"msg": "flaky"}},
        )
        retried = r.json()
        assert retried["status"] == "pending"
        assert retried["retries"] == 1
        assert retried["not_before"] is not None
        assert await claim(c, q) is None, "backing off"
        again = await claim(c, q, block_ms=5000)
        assert again is not None
        final = (
            await c.post(
                f"/v1/tasks/{task['id']}/fail",
                json={"worker_id": "w1", "lease_id": again["lease"]["id"], "error": "still"},
            )
        ).json()
        assert final["status"] == "failed"
        assert final["error"] == "still"
        problem(await c.post(f"/v1/tasks/{task['id']}/cancel"), 409)


async def test_non_retryable_failure_fails_at_once_and_cancel_rules(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c, stack.client(role="submitter") as s:
        task = await submit(c, q, max_retries=5)
        leased = await claim(c, q)
        assert leased is not None
        failed = (
            await c.post(
                f"/v1/tasks/{task['id']}/fail",
                json={"worker_id": "w1", "lease_id": leased["lease"]["id"], "retryable": False},
            )
        ).json()
        assert failed["status"] == "failed"
        other = await submit(s, q)
        cancelled = (await s.post(f"/v1/tasks/{other['id']}/cancel", json={"reason": "obsolete"})).json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["cancellation_reason"] == "obsolete"
        problem(await s.post(f"/v1/tasks/{other['id']}/cancel"), 409)


async def test_unrenewed_lease_returns_the_task_to_pending(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        task = await submit(c, q)
        leased = await claim(c, q, lease_seconds=1)
        assert leased is not None
        again = await claim(c, q, worker="w2", block_ms=5000)
        assert again is not None
        assert again["task"]["id"] == task["id"]
        assert again["task"]["retries"] == 1
        problem(
            await c.post(
                f"/v1/tasks/{task['id']}/complete", json={"worker_id": "w1", "lease_id": leased["lease"]["id"]}
            ),
            409,
        )


async def test_idempotent_retries_return_the_original_and_append_nothing(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        body = {"type": "deploy", "queue": q}
        first = await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "submit-1"})
        seq = await last_seq(stack)
        again = await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "submit-1"})
        assert again.status_code == 201
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["seq"] == first.json()["seq"]
        problem(
            await c.post("/v1/tasks", json={**body, "priority": "high"}, headers={"Idempotency-Key": "submit-1"}), 409
        )
        claimed = await c.post(
            "/v1/tasks/claim", json={"worker_id": "w1", "queue": q}, headers={"Idempotency-Key": "claim-1"}
        )
        seq = await last_seq(stack)
        reclaimed = await c.post(
            "/v1/tasks/claim", json={"worker_id": "w1", "queue": q}, headers={"Idempotency-Key": "claim-1"}
        )
        assert reclaimed.json()["lease"] == claimed.json()["lease"]
        lease = {"worker_id": "w1", "lease_id": claimed.json()["lease"]["id"]}
        done = await c.post(f"/v1/tasks/{first.json()['id']}/complete", json=lease, headers={"Idempotency-Key": "done"})
        seq = await last_seq(stack)
        redone = await c.post(
            f"/v1/tasks/{first.json()['id']}/complete", json=lease, headers={"Idempotency-Key": "done"}
        )
        assert redone.status_code == 200
        assert redone.json()["seq"] == done.json()["seq"]
        assert await appended_since(stack, seq) == []


async def _read_sse(response: httpx.Response, count: int) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if current:
                events.append(current)
                current = {}
                if len(events) == count:
                    return events
            continue
        field, _, value = line.partition(": ")
        current[field] = value
    return events


async def test_task_events_stream_and_resume_after_disconnect(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        task = await submit(c, q)
        async with c.stream("GET", f"/v1/tasks/{task['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            first = await asyncio.wait_for(_read_sse(response, 1), 5)
        assert first[0]["event"] == "TaskSubmitted"
        leased = await claim(c, q)
        assert leased is not None
        await c.post(f"/v1/tasks/{task['id']}/complete", json={"worker_id": "w1", "lease_id": leased["lease"]["id"]})
        async with c.stream(
            "GET", f"/v1/tasks/{task['id']}/events", headers={"Last-Event-ID": first[0]["id"]}
        ) as response:
            rest = await asyncio.wait_for(_read_sse(response, 2), 5)
        assert [e["event"] for e in rest] == ["TaskClaimed", "TaskCompleted"]
        assert int(rest[0]["id"]) > int(first[0]["id"])
        problem(await c.get(f"/v1/tasks/{task['id']}/events", headers={"Last-Event-ID": "abc"}), 422)


async def test_org_feed_follows_live_and_filters_by_type(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        after = await last_seq(stack)
        async with c.stream("GET", "/v1/events", params={"after": after, "types": "TaskCompleted", "queue": q}) as rsp:
            reading = asyncio.create_task(_read_sse(rsp, 1))
            task = await submit(c, q)
            leased = await claim(c, q)
            assert leased is not None
            await c.post(
                f"/v1/tasks/{task['id']}/complete", json={"worker_id": "w1", "lease_id": leased["lease"]["id"]}
            )
            events = await asyncio.wait_for(reading, 5)
        assert events[0]["event"] == "TaskCompleted"
        assert task["id"] in events[0]["data"]
        problem(await c.get("/v1/events", params={"types": "NoSuchEvent"}), 422)


async def test_workers_register_heartbeat_list_and_leave(stack: Stack) -> None:
    q = queue()
    async with stack.client(role="worker") as w:
        r = await w.post(
            "/v1/workers",
            json={"worker_id": "wk1", "queue": q, "capabilities": ["gpu"], "labels": {"zone": "eu"}, "model": "gpt-x"},
        )
        assert r.status_code == 201
        assert r.json()["status"] == "starting"
        hb = await w.post("/v1/workers/wk1/heartbeat", json={"status": "ready"})
        assert hb.json()["status"] == "ready"
        problem(await w.post("/v1/workers/wk1/heartbeat", json={"status": "sleeping"}), 422)
        await stack.services.read_model.wait_for("workers", hb.json()["seq"], 5)
        listed = (await w.get("/v1/workers", params={"queue": q, "capability": "gpu", "available": "true"})).json()
        assert [x["id"] for x in listed["items"]] == ["wk1"]
        assert (await w.delete("/v1/workers/wk1")).status_code == 204
        problem(await w.post("/v1/workers/wk1/heartbeat", json={"status": "ready"}), 404)


async def test_api_keys_are_shown_once_and_revocable(stack: Stack) -> None:
    async with stack.client() as admin:
        created = await admin.post("/v1/api-keys", json={"name": "ci", "roles": ["viewer"]})
        assert created.status_code == 201
        key = created.json()["key"]
        await stack.services.read_model.wait_for("access", created.json()["seq"], 5)
        async with httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}) as ci:
            assert (await ci.get("/v1/tasks")).status_code == 200
            assert (await admin.delete(f"/v1/api-keys/{created.json()['id']}")).status_code == 204
            problem(await ci.get("/v1/tasks"), 401)
        problem(await admin.post("/v1/api-keys", json={"name": "x", "roles": ["root"]}), 422)


async def test_jwt_bearer_hs256_and_rs256(stack: Stack) -> None:
    claims = {"sub": "alice", "org": "acme", "roles": ["viewer"], "exp": int(time.time()) + 60, **JWT_SCOPE}
    for token in (
        jwt.encode(claims, HS256_SECRET, algorithm="HS256"),
        jwt.encode(claims, stack.rsa_private_pem, algorithm="RS256"),
    ):
        async with httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}) as c:
            assert (await c.get("/v1/tasks")).status_code == 200
            problem(await c.post("/v1/tasks", json={"type": "x"}), 403)
    expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, HS256_SECRET, algorithm="HS256")
    forged = jwt.encode(claims, "another-secret-that-is-long-enough!!", algorithm="HS256")
    for token in (expired, forged):
        async with httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}) as c:
            problem(await c.get("/v1/tasks"), 401)


async def test_rate_limit_answers_429(stack: Stack) -> None:
    original = stack.services.rate_limiter
    stack.services.rate_limiter = RateLimiter(rate=1, burst=2)
    try:
        async with stack.client(role="viewer") as c:
            codes = [(await c.get("/v1/tasks")).status_code for _ in range(4)]
            assert codes[:2] == [200, 200]
            assert 429 in codes[2:]
            limited = await c.get("/v1/tasks")
            problem(limited, 429)
            assert int(limited.headers["retry-after"]) >= 1
    finally:
        stack.services.rate_limiter = original


async def test_health_readiness_metrics_stats_and_docs(stack: Stack) -> None:
    async with stack.client(role="viewer") as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200
        assert set(ready.json()["projection_lag"]) == {
            "tasks",
            "workers",
            "access",
            "usage",
            "environments",
            "schedules",
            "queues",
            "worker_config",
            "secrets",
        }
        stats = (await c.get("/v1/stats")).json()
        assert "by_status" in stats["tasks"]
        assert "projection_lag" in stats
        metrics = (await c.get("/metrics")).text
        assert "cp_http_requests_total" in metrics
        assert "cp_projection_lag_events" in metrics
        spec = (await c.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.")
        assert "/v1/tasks/claim" in spec["paths"]
        assert "/v1/tasks/claim" in (await c.get("/docs")).text


async def test_strings_with_nul_are_refused_before_they_reach_the_log(stack: Stack) -> None:
    before = await last_seq(stack)
    async with stack.client() as c:
        problem(await c.post("/v1/tasks", json={"type": "x", "payload": {"note": "a\u0000b"}}), 422)
        problem(await c.post("/v1/tasks", json={"type": "x", "metadata": {"k\u0000": 1}}), 422)
        problem(await c.post("/v1/workers", json={"worker_id": "w", "labels": {"zone": "\u0000"}}), 422)
        problem(await c.post("/v1/tasks", json={"type": "x", "workflow": {"name": "w", "version": 2**40}}), 422)
        ok = await c.post("/v1/tasks", json={"type": "x", "payload": {"path": "C:\\u0000 is text here"}})
        assert ok.status_code == 201, "an escaped backslash followed by u0000 is not a NUL"
    assert len(await appended_since(stack, before)) == 1


async def test_an_approval_that_times_out_returns_the_task_and_escalation_widens_who_may_decide(stack: Stack) -> None:
    q = queue()
    async with stack.client() as admin, stack.client(role="approver") as approver:
        task = await submit(admin, q)
        leased = await claim(admin, q)
        assert leased is not None
        lease = {"worker_id": "w1", "lease_id": leased["lease"]["id"]}
        approval = (
            await admin.post(
                f"/v1/tasks/{task['id']}/approval-requests",
                json={
                    **lease,
                    "reason": "night deploy",
                    "approvers": ["oncall-lead"],
                    "timeout_seconds": 2,
                    "escalation": {"after_seconds": 1, "approvers": ["role:approver"]},
                },
            )
        ).json()
        assert approval["expires_at"] is not None
        problem(await approver.post(f"/v1/approvals/{approval['id']}/approve"), 403)
        await asyncio.sleep(1.3)
        escalated = (await approver.get(f"/v1/approvals/{approval['id']}")).json()
        assert escalated["escalated"] is True
        assert "role:approver" in escalated["approvers"]

        other = await submit(admin, q)
        leased = await claim(admin, q)
        assert leased is not None
        assert leased["task"]["id"] == other["id"]
        late = (
            await admin.post(
                f"/v1/tasks/{other['id']}/approval-requests",
                json={"worker_id": "w1", "lease_id": leased["lease"]["id"], "reason": "r", "timeout_seconds": 1},
            )
        ).json()
        async with asyncio.timeout(10):
            while (await admin.get(f"/v1/approvals/{late['id']}")).json()["status"] != "timed_out":
                await asyncio.sleep(0.1)
        back = (await admin.get(f"/v1/tasks/{other['id']}")).json()
        assert back["status"] == "pending"
        problem(await approver.post(f"/v1/approvals/{late['id']}/approve"), 409)


async def test_workers_and_keys_of_other_orgs_are_not_found(stack: Stack) -> None:
    async with stack.client() as acme, stack.client("globex") as globex:
        worker = f"w{new_id()[-8:]}"
        assert (await acme.post("/v1/workers", json={"worker_id": worker})).status_code == 201
        problem(await globex.get(f"/v1/workers/{worker}"), 404)
        problem(await globex.post(f"/v1/workers/{worker}/heartbeat", json={"status": "ready"}), 404)
        problem(await globex.delete(f"/v1/workers/{worker}"), 404)
        key = (await acme.post("/v1/api-keys", json={"name": "acme-only", "roles": ["viewer"]})).json()
        problem(await globex.delete(f"/v1/api-keys/{key['id']}"), 404)
        assert (await acme.get(f"/v1/workers/{worker}")).json()["id"] == worker


async def test_a_batch_claim_takes_several_tasks_in_claim_order_and_a_retry_returns_the_same(stack: Stack) -> None:
    q = queue()
    async with stack.client() as c:
        low = await submit(c, q, priority="low")
        high = await submit(c, q, priority="high")
        normal = await submit(c, q)
        body = {"worker_id": "w1", "queue": q, "max_tasks": 2, "lease_seconds": 60}
        first = await c.post("/v1/tasks/claim-batch", json=body, headers={"Idempotency-Key": "batch-1"})
        assert first.status_code == 200, first.text
        assert [item["task"]["id"] for item in first.json()["items"]] == [high["id"], normal["id"]]
        assert {item["task"]["status"] for item in first.json()["items"]} == {"running"}
        seq_before = await last_seq(stack)
        retried = await c.post("/v1/tasks/claim-batch", json=body, headers={"Idempotency-Key": "batch-1"})
        assert retried.json()["items"] == first.json()["items"]
        assert await appended_since(stack, seq_before) == [], "a retry appends nothing"
        rest = await c.post("/v1/tasks/claim-batch", json=body)
        assert [item["task"]["id"] for item in rest.json()["items"]] == [low["id"]]
        assert (await c.post("/v1/tasks/claim-batch", json=body)).status_code == 204
        problem(await c.post("/v1/tasks/claim-batch", json={**body, "max_tasks": 101}), 422)


async def test_the_submit_policy_gates_risky_tasks_behind_a_human_and_refuses_bad_ones(stack: Stack) -> None:
    q = queue()
    async with (
        stack.client(role="submitter") as submitter,
        stack.client(role="approver") as approver,
        stack.client(role="worker") as worker,
    ):
        await into_environment(stack, "prod", q)  # the queue's environment decides, not the submitter
        gated = await submit(submitter, q)
        assert (gated["status"], gated["environment"]) == ("awaiting_approval", "prod")
        [gate] = gated["approvals"]
        assert gate["requested_by"] == "policy"
        assert "prod" in gate["reason"]
        assert await claim(worker, q) is None, "nobody works on it before a human agreed"
        problem(await submitter.post(f"/v1/approvals/{gate['id']}/approve"), 403)
        assert (await approver.post(f"/v1/approvals/{gate['id']}/approve")).json()["status"] == "approved"
        leased = await claim(worker, q)
        assert leased is not None and leased["task"]["id"] == gated["id"]

        refused = await submit(submitter, q, metadata={"environment": "dev"})
        await approver.post(f"/v1/approvals/{refused['approvals'][0]['id']}/reject", json={"reason": "not today"})
        cancelled = (await submitter.get(f"/v1/tasks/{refused['id']}")).json()
        assert cancelled["status"] == "cancelled"

        seq_before = await last_seq(stack)
        body = {"type": "deploy", "queue": q, "metadata": {"tools": "rm -rf /"}}  # tools must be a list
        denied = problem(await submitter.post("/v1/tasks", json=body, headers={"Idempotency-Key": "risky"}), 403)
        assert "denied" in denied["detail"] and "tools" in denied["detail"]
        again = problem(await submitter.post("/v1/tasks", json=body, headers={"Idempotency-Key": "risky"}), 403)
        assert again["detail"] == denied["detail"]
        assert len(await appended_since(stack, seq_before)) == 1, "the denial is recorded once; no task is created"
        listed = await submitter.get("/v1/tasks", params={"queue": q, "min_seq": seq_before + 1})
        assert {t["id"] for t in listed.json()["items"]} == {gated["id"], refused["id"]}
    ready = (await httpx.AsyncClient(base_url=stack.url).get("/readyz")).json()
    assert ready["policy"]["engine"] in ("regopy", "opa-wasm")
    assert ready["policy"]["bundle_digest"].startswith("sha256:")
