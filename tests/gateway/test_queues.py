"""Queue settings over HTTP, through the real stack: an admin sets a queue's claim strategy and
breaker; the workers waiting on it are then served as the strategy says, and its workers' breakers
open after its count of failures."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from controlplane.cli import main
from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import appended_since, last_seq, problem, queue, submit
from tests.gateway.test_breakers import claim, client, complete, fail_one, register

pytestmark = pytest.mark.integration


async def configure(admin: httpx.AsyncClient, q: str, **settings: Any) -> dict[str, Any]:
    r = await admin.put(f"/v1/queues/{q}", json=settings)
    assert r.status_code == 200, r.text
    return r.json()


async def test_an_admin_sets_reads_and_removes_a_queues_settings(stack: Stack) -> None:
    _, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["viewer"]) as viewer:
        default = (await viewer.get(f"/v1/queues/{q}")).json()
        assert (default["strategy"], default["breaker"], default["configured"]) == (
            "fifo",
            {"failures": 3, "cooldown_seconds": 60.0},
            False,
        )
        made = await configure(admin, q, strategy="round_robin", breaker={"failures": 5, "cooldown_seconds": 30})
        assert (made["strategy"], made["breaker"], made["configured"]) == (
            "round_robin",
            {"failures": 5, "cooldown_seconds": 30.0},
            True,
        )
        assert made["seq"] > 0
        listed = (await viewer.get("/v1/queues", params={"min_seq": made["seq"]})).json()["items"]
        assert [(item["name"], item["strategy"]) for item in listed] == [(q, "round_robin")]
        removed = await admin.delete(f"/v1/queues/{q}")
        assert removed.status_code == 200 and removed.json()["configured"] is False
        assert removed.json()["seq"] > made["seq"], "a removal answers with its seq, for min_seq readers"
        assert (await viewer.get("/v1/queues", params={"min_seq": removed.json()["seq"]})).json()["items"] == []
        problem(await admin.delete(f"/v1/queues/{q}"), 404)


async def test_only_admins_change_settings_bad_input_is_422_and_nothing_refused_is_appended(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    seq = await last_seq(stack)
    for role in ("submitter", "worker", "approver", "viewer"):
        async with client(stack, keys[role]) as c:
            problem(await c.put(f"/v1/queues/{q}", json={"strategy": "random"}), 403)
            problem(await c.delete(f"/v1/queues/{q}"), 403)
    async with client(stack, keys["admin"]) as admin:
        for bad in (
            {"strategy": "lifo"},
            {"breaker": {"failures": 0}},
            {"breaker": {"cooldown_seconds": 0.5}},
            {"breaker": {"failures": "three"}},
            {"strategy": ["fifo"]},
        ):
            refused = problem(await admin.put(f"/v1/queues/{q}", json=bad), 422)
            assert refused["detail"]
        problem(await admin.put("/v1/queues/not.a.queue", json={}), 404)
    assert await appended_since(stack, seq, org) == [], "nothing refused was appended"
    async with client(stack, keys["admin"]) as admin:
        first = await admin.put(f"/v1/queues/{q}", json={"strategy": "random"}, headers={"Idempotency-Key": "q-1"})
        seq = first.json()["seq"]
        again = await admin.put(f"/v1/queues/{q}", json={"strategy": "random"}, headers={"Idempotency-Key": "q-1"})
        assert again.json() == first.json()
    assert await appended_since(stack, seq, org) == [], "a retry appends nothing"


async def serve_waiting_workers(
    stack: Stack, org: str, keys: dict[str, str], q: str, workers: list[str], tasks: int, *, keep: bool = False
) -> list[str]:
    """Each task is submitted while every worker waits in a long-poll claim; returns which worker got
    each. With ``keep``, a worker keeps its tasks (its load grows) instead of completing them."""
    order: list[str] = []
    async with client(stack, keys["worker"]) as w, client(stack, keys["submitter"]) as s:
        for worker in workers:
            await register(w, worker, q)

        async def serve(worker: str) -> None:
            while len(order) < tasks:
                r = await w.post("/v1/tasks/claim", json={"worker_id": worker, "queue": q, "block_ms": 10_000})
                assert r.status_code in (200, 204), r.text
                if r.status_code == 200:
                    order.append(worker)
                    if not keep:
                        await complete(w, r.json(), worker)

        serving = [asyncio.create_task(serve(worker)) for worker in workers]
        try:
            for submitted in range(tasks):
                async with asyncio.timeout(10):
                    while stack.services.claim_index.waiting(org, q) < len(workers) or len(order) < submitted:
                        await asyncio.sleep(0.005)
                await submit(s, q)
            async with asyncio.timeout(10):
                while len(order) < tasks:
                    await asyncio.sleep(0.01)
        finally:
            for task in serving:
                task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
    return order


async def test_round_robin_serves_the_waiting_workers_in_turn(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        await configure(admin, q, strategy="round_robin")
    order = await serve_waiting_workers(stack, org, keys, q, ["w-c", "w-a", "w-d", "w-b"], 12)
    assert order == ["w-a", "w-b", "w-c", "w-d"] * 3


async def test_least_loaded_serves_the_worker_holding_the_fewest_leases(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        await configure(admin, q, strategy="least_loaded")
    order = await serve_waiting_workers(stack, org, keys, q, ["w1", "w2", "w3"], 9, keep=True)
    assert Counter(order) == {"w1": 3, "w2": 3, "w3": 3}, "each keeps its tasks, so the load evens out"
    for start in range(0, 9, 3):
        assert sorted(order[start : start + 3]) == ["w1", "w2", "w3"], order


async def test_fifo_serves_the_claimer_waiting_longest(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    order = await serve_waiting_workers(stack, org, keys, q, ["w1", "w2", "w3"], 6)
    # A served worker completes and waits again: it is then the newest waiter.
    assert order == ["w1", "w2", "w3", "w1", "w2", "w3"]


async def test_random_serves_every_waiting_worker(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        await configure(admin, q, strategy="random")
    order = await serve_waiting_workers(stack, org, keys, q, ["w1", "w2", "w3", "w4"], 40)
    counts = Counter(order)
    # Each is chosen with probability 1/4: all four serve at least once but with a chance of 4 · 0.75^40 ≈ 4e-5.
    assert set(counts) == {"w1", "w2", "w3", "w4"}, counts
    assert max(counts.values()) < 30, counts


async def test_a_queues_breaker_settings_decide_when_its_workers_breaker_opens(stack: Stack) -> None:
    _, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        await configure(admin, q, breaker={"failures": 1, "cooldown_seconds": 120})
    async with client(stack, keys["worker"]) as w, client(stack, keys["submitter"]) as s:
        await register(w, "fragile", q)
        await register(w, "steady", q)
        await fail_one(w, s, "fragile", q)
        shown = (await w.get("/v1/workers/fragile")).json()
        assert shown["status"] == "failed", "one failure opens the breaker on this queue"
        await submit(s, q)
        assert await claim(w, "fragile", q) is None
        assert await claim(w, "steady", q) is not None


async def test_the_cli_sets_shows_lists_and_removes_queue_settings(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, keys = await new_org(stack)
    q = queue()
    monkeypatch.setenv("CP_API_KEY", keys["admin"])

    async def cli(*argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, ["queues", *argv, "--url", stack.url])
        return code, capsys.readouterr().out

    assert (await cli("list"))[1].startswith("no queue has settings of its own")
    code, out = await cli("set", q, "--strategy", "least_loaded", "--breaker-failures", "5")
    assert code == 0 and "least_loaded" in out and "after 5 failures for 60 s" in out
    assert (await cli("list"))[1].split()[:2] == [q, "least_loaded"]
    code, out = await cli("remove", q)
    assert code == 0 and "fifo" in out and "(defaults)" in out
    with pytest.raises(SystemExit) as refused:
        await cli("set", q, "--breaker-failures", "0")
    assert refused.value.code == 1 and "422" in capsys.readouterr().err
