"""Problem answers become the exception classes of the contract; transient failures are retried with
one Idempotency-Key per POST, so a retry whose first answer was lost appends nothing twice: a submit,
a claim or a completion happens once."""

from __future__ import annotations

import time

import httpx
import pytest

from controlplane.client import (
    Conflict,
    Forbidden,
    NotFound,
    ProblemError,
    Unauthorized,
    Unavailable,
    Unprocessable,
)
from tests.client.conftest import Connect, Drop, Fault, Faults, Proxy
from tests.gateway.conftest import Stack
from tests.gateway.test_api import queue

pytestmark = pytest.mark.integration


async def test_problem_answers_raise_their_classes(connect: Connect) -> None:
    q = queue()
    refused = [
        (Unauthorized, 401, connect(key="cp_nobody_nothing").get("anything")),
        (Forbidden, 403, connect("viewer").submit("deploy", queue=q)),
        (NotFound, 404, connect("viewer").get("no-such-task")),
        (Unprocessable, 422, connect("submitter").submit("deploy", queue=q, priority="urgent")),
    ]
    for kind, status, call in refused:
        with pytest.raises(kind) as raised:
            await call
        problem = raised.value
        assert isinstance(problem, ProblemError)
        assert (problem.status, bool(problem.title), bool(problem.detail)) == (status, True, True)
        assert str(status) in str(problem) and problem.detail in str(problem)

    submitter = connect("submitter")
    task = await submitter.submit("deploy", queue=q)
    await submitter.cancel(task.id)
    with pytest.raises(Conflict) as conflict:
        await submitter.cancel(task.id)
    assert conflict.value.status == 409 and "cancel" in conflict.value.detail.lower()


async def test_a_retried_post_reuses_its_key_and_appends_once(connect: Connect) -> None:
    """The first attempt is refused (429, Retry-After: 1), the second reaches the gateway but its answer
    is lost, the third gets the original outcome."""
    plan: list[Fault] = [
        httpx.Response(429, headers={"Retry-After": "1"}, json={"title": "Too many requests", "status": 429}),
        Drop(),
    ]
    faults = Faults(lambda request: plan.pop(0) if request.method == "POST" and plan else None)
    client = connect("submitter", transport=faults)
    q = queue()
    started = time.monotonic()
    task = await client.submit("deploy", {"n": 1}, queue=q)
    elapsed = time.monotonic() - started

    attempts = faults.sent("POST", "/v1/tasks")
    keys = {request.headers["idempotency-key"] for request in attempts}
    assert len(attempts) == 3 and len(keys) == 1, "every attempt of one POST carries the same key"
    assert elapsed >= 1.0, "never sooner than Retry-After"
    assert [listed.id for listed in await client.list(queue=q)] == [task.id], "one task"
    assert (await client.get(task.id)).seq == task.seq, "and nothing appended to it since"

    second = await client.submit("deploy", {"n": 2}, queue=q)
    assert second.id != task.id
    assert faults.sent("POST", "/v1/tasks")[-1].headers["idempotency-key"] not in keys, "each POST its own key"


async def test_past_the_retry_budget_the_call_raises_unavailable(connect: Connect) -> None:
    faults = Faults(lambda request: httpx.Response(503, json={"title": "Service unavailable", "detail": "down"}))
    client = connect("viewer", transport=faults, retry_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="gave up after") as raised:
        await client.get("some-task")
    assert time.monotonic() - started < 2
    assert len(faults.requests) > 1, "retried before giving up"
    assert isinstance(raised.value.__cause__, Unavailable) and raised.value.__cause__.detail == "down"


async def test_retries_through_a_failing_proxy_never_double_a_submit_or_a_claim(connect: Connect, stack: Stack) -> None:
    """Through a proxy that refuses each POST's first attempt (503) and loses the answer to its second
    (the gateway acted), the submit, the claim and the completion each happen once, and the claim
    returned holds the lease the log recorded."""
    async with Proxy(stack.url) as proxy:
        submitter, worker = connect("submitter", url=proxy.url), connect("worker", url=proxy.url)
        q = queue()
        proxy.plan = ["refuse", "lose"]
        task = await submitter.submit("deploy", {"n": 1}, queue=q)
        proxy.plan = ["refuse", "lose"]
        claim = await worker.workers.claim("w-proxied", queue=q, block_ms=5000)
        proxy.plan = ["refuse", "lose"]
        assert claim is not None and claim.task.id == task.id
        done = await worker.workers.complete(claim, {"ok": True})
        assert proxy.plan == [], "every planned fault was met"

        for path_end in ("/v1/tasks", "/v1/tasks/claim", f"/v1/tasks/{task.id}/complete"):
            attempts = proxy.sent("POST", path_end)
            assert len(attempts) == 3, f"POST {path_end}: refused, lost, answered"
            assert len({request.headers["idempotency-key"] for request in attempts}) == 1

    assert (done.status, done.result) == ("completed", {"ok": True})
    viewer = connect("viewer")
    assert [listed.id for listed in await viewer.list(queue=q, min_seq=done.seq)] == [task.id], "one task"
    events = await viewer.take(3, task_id=task.id)
    assert [event.type for event in events] == ["TaskSubmitted", "TaskClaimed", "TaskCompleted"], "each once"
    assert (events[1].data["worker_id"], events[1].data["lease_id"]) == ("w-proxied", claim.lease.id)
