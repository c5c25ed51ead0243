"""Issue 14, finding 3: a lease is bound to the credential that claimed it. Another credential of the
org (another worker key, a JWT of another subject, an admin key) that learns a lease's id and worker id
still cannot heartbeat, complete, fail, ask for approval, record, sleep or report non-determinism on it:
the decider refuses it with the very 409 a wrong lease id gets. Task documents show the lease's id to
the claimer only."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.domain.commands import (
    ROLES,
    Actor,
    ClaimTask,
    Command,
    CompleteTask,
    FailTask,
    HeartbeatTask,
    RecordOperation,
    ReportNonDeterminism,
    RequestApproval,
    StartSleep,
    SubmitTask,
)
from core.domain.decider import DecisionContext
from core.domain.errors import LeaseLost
from core.domain.events import TaskClaimed, decode_event, encode_event
from core.domain.ids import new_id
from core.domain.task import Task
from core.domain.task_decider import TASK
from tests.gateway.conftest import HS256_SECRET, JWT_SCOPE, Stack, own_stack

START = datetime(2026, 3, 1, tzinfo=UTC)
TASK_ID, WORKER_ID, LEASE_ID = "t1", "w1", "l1"
LEASE_BOUND = ("heartbeat", "approval", "complete", "fail", "operation", "sleep", "non-determinism")


# --- the rule, in the decider ---------------------------------------------------------------------


def lease_bound(kind: str, task: Task, worker_id: str, lease_id: str) -> Command:
    """A well-formed lease-bound command of ``kind`` for ``task`` as it is now."""
    lease = {"task_id": task.id, "worker_id": worker_id, "lease_id": lease_id}
    index = len(task.journal)
    match kind:
        case "heartbeat":
            return HeartbeatTask(**lease, lease_seconds=60, progress={"pct": 50})
        case "approval":
            return RequestApproval(**lease, approval_id=f"{task.id}-{len(task.approvals) + 1}", reason="ship?")
        case "complete":
            return CompleteTask(**lease, result={"stolen": True})
        case "fail":
            return FailTask(**lease, error="sabotage", retryable=False)
        case "operation":
            return RecordOperation(**lease, index=index, kind="step", name="forged", result=1)
        case "sleep":
            return StartSleep(**lease, index=index, seconds=3600)
    return ReportNonDeterminism(**lease, index=index, expected={"kind": "step"}, actual={"kind": "llm"})


def claimed(claimer: Actor, recorded: int) -> Task:
    """A task claimed by ``claimer``, with ``recorded`` operations in its journal."""
    state = None
    at = START
    for command, actor in [
        (SubmitTask(task_id=TASK_ID, task_type="deploy"), Actor("submitter", frozenset({"submitter"}))),
        (ClaimTask(task_id=TASK_ID, worker_id=WORKER_ID, lease_id=LEASE_ID, lease_seconds=60), claimer),
        *[
            (
                RecordOperation(
                    task_id=TASK_ID, worker_id=WORKER_ID, lease_id=LEASE_ID, index=i, kind="step", name="s"
                ),
                claimer,
            )
            for i in range(recorded)
        ],
    ]:
        state = TASK.fold(TASK.decide(state, command, DecisionContext("acme", at, actor)), state)
        at += timedelta(seconds=1)
    assert state is not None
    return state


actor_ids = st.sampled_from(["key:0193a", "key:0193b", "jwt:bot-1", "jwt:bot-2", "jwt:ops", "system", "sam"])
roles = st.sets(st.sampled_from(sorted(ROLES)), min_size=1).map(frozenset)


@settings(max_examples=400, deadline=None)
@given(
    claimer=st.builds(Actor, actor_ids, roles),
    intruder=st.builds(Actor, actor_ids, roles),
    kind=st.sampled_from(LEASE_BOUND),
    recorded=st.integers(0, 3),
    later=st.floats(0, 50),
)
def test_a_lease_bound_command_from_anyone_but_the_claimer_is_refused_and_changes_nothing(
    claimer: Actor, intruder: Actor, kind: str, recorded: int, later: float
) -> None:
    """Whatever its roles (admin too) and however exactly it names the lease, an actor that did not
    claim gets the refusal a wrong lease id gets; the claimer's same command is accepted."""
    task = claimed(claimer, recorded)
    now = START + timedelta(seconds=recorded + 2 + later)  # within the 60 s lease
    command = lease_bound(kind, task, WORKER_ID, LEASE_ID)
    accepted = TASK.decide(task, command, DecisionContext("acme", now, claimer))
    assert accepted, "the claimer may use its lease"
    if intruder.id == claimer.id:
        return
    snapshot = msgspec.json.encode(task)
    with pytest.raises(LeaseLost) as refused:
        TASK.decide(task, command, DecisionContext("acme", now, intruder))
    assert msgspec.json.encode(task) == snapshot, "a refusal changes nothing"
    with pytest.raises(LeaseLost) as wrong_id:
        TASK.decide(task, lease_bound(kind, task, WORKER_ID, "guessed"), DecisionContext("acme", now, claimer))
    assert str(refused.value) == str(wrong_id.value).replace("guessed", LEASE_ID), "the refusal tells nothing more"
    assert claimer.id not in str(refused.value)


def test_the_claim_records_who_claimed_and_an_older_claim_still_decodes() -> None:
    task = claimed(Actor("key:0193a", frozenset({"worker"})), 0)
    assert task.lease is not None and task.lease.holder == "key:0193a"
    old = TaskClaimed(at=START, worker_id="w1", lease_id="l1", lease_seconds=30, lease_expires_at=START, attempt=1)
    raw = msgspec.json.decode(encode_event(old))
    del raw["claimed_by"]  # as recorded before leases were bound
    assert decode_event(msgspec.json.encode(raw)) == old
    assert old.claimed_by is None


# --- over HTTP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", name="stack")
async def security_stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    """A stack of the importing module's own, as fixture ``stack`` (other modules here import it)."""
    async with own_stack(tmp_path_factory.mktemp("security-nats"), database_url) as served:
        yield served


def bearer(url: str, credential: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {credential}"}, timeout=20)


def a_jwt(subject: str, org: str = "acme", roles: tuple[str, ...] = ("worker",)) -> str:
    claims = {"sub": subject, "org": org, "roles": list(roles), "exp": int(time.time()) + 600, **JWT_SCOPE}
    return jwt.encode(claims, HS256_SECRET, algorithm="HS256")


async def another_worker_key(stack: Stack) -> str:
    async with stack.client() as admin:
        issued = (await admin.post("/v1/api-keys", json={"name": f"w-{new_id()[-6:]}", "roles": ["worker"]})).json()
    await stack.services.read_model.wait_for("access", issued["seq"], 5)
    return str(issued["key"])


def bodies(lease: dict[str, str], index: int) -> dict[str, dict[str, Any]]:
    """A valid body for every lease-bound endpoint, naming the lease exactly."""
    return {
        "heartbeat": {**lease, "lease_seconds": 60},
        "approval-requests": {**lease, "reason": "may I?"},
        "operations": {**lease, "index": index, "kind": "step", "name": "forged", "result": 1},
        "sleep": {**lease, "index": index, "seconds": 3600},
        "non-determinism": {**lease, "index": index, "expected": "a", "actual": "b"},
        "fail": {**lease, "error": "sabotage", "retryable": False},
        "complete": {**lease, "result": {"stolen": True}},
    }


async def submit_and_claim(stack: Stack, claimer: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    queue = f"lb{new_id()[-10:]}"
    async with stack.client(role="submitter") as submitter:
        task = (await submitter.post("/v1/tasks", json={"type": "deploy", "queue": queue})).json()
    claim = await claimer.post("/v1/tasks/claim", json={"worker_id": "w1", "queue": queue, "lease_seconds": 120})
    assert claim.status_code == 200, claim.text
    assert claim.json()["task"]["id"] == task["id"]
    return task["id"], claim.json()


@pytest.mark.integration
async def test_another_credential_of_the_org_cannot_use_a_lease_it_did_not_take(stack: Stack) -> None:
    others = {"another worker key": await another_worker_key(stack), "an admin key": stack.keys["acme"]["admin"]}
    others["a JWT of another subject"] = a_jwt("bot-2", roles=("worker", "admin"))
    async with bearer(stack.url, stack.keys["acme"]["worker"]) as claimer:
        task_id, claim = await submit_and_claim(stack, claimer)
        lease = {"worker_id": "w1", "lease_id": claim["lease"]["id"]}
        before = (await claimer.get(f"/v1/tasks/{task_id}")).json()
        for who, credential in others.items():
            async with bearer(stack.url, credential) as intruder:
                for action, body in bodies(lease, 0).items():
                    r = await intruder.post(f"/v1/tasks/{task_id}/{action}", json=body)
                    assert r.status_code == 409, (who, action, r.text)
                    wrong = await claimer.post(f"/v1/tasks/{task_id}/{action}", json={**body, "lease_id": "guessed"})
                    assert r.json()["detail"] == wrong.json()["detail"].replace("guessed", lease["lease_id"]), (
                        who,
                        action,
                    )
        after = (await claimer.get(f"/v1/tasks/{task_id}")).json()
        assert after == before, "nothing was appended"
        done = await claimer.post(f"/v1/tasks/{task_id}/complete", json={**lease, "result": {"ok": True}})
        assert done.status_code == 200, done.text
        assert done.json()["result"] == {"ok": True}


@pytest.mark.integration
async def test_a_jwt_lease_is_bound_to_its_subject(stack: Stack) -> None:
    async with bearer(stack.url, a_jwt("bot-1")) as first, bearer(stack.url, a_jwt("bot-1")) as same_subject:
        task_id, claim = await submit_and_claim(stack, first)
        lease = {"worker_id": "w1", "lease_id": claim["lease"]["id"]}
        async with bearer(stack.url, a_jwt("bot-3")) as other:
            assert (await other.post(f"/v1/tasks/{task_id}/heartbeat", json=lease)).status_code == 409
        renewed = await same_subject.post(f"/v1/tasks/{task_id}/heartbeat", json=lease)
        assert renewed.status_code == 200, "a fresh token of the same subject is the same credential"
        history = await stack.services.handler.history("acme", "task", task_id)
        assert [r.event.claimed_by for r in history if isinstance(r.event, TaskClaimed)] == ["jwt:bot-1"]


@pytest.mark.integration
async def test_only_the_claimer_sees_the_lease_id_in_task_documents(stack: Stack) -> None:
    another = await another_worker_key(stack)
    async with bearer(stack.url, stack.keys["acme"]["worker"]) as claimer:
        task_id, claim = await submit_and_claim(stack, claimer)
        lease = claim["lease"]
        assert claim["task"]["lease"] == lease, "the claim answers the claimer with its lease"
        mine = (await claimer.get(f"/v1/tasks/{task_id}")).json()
        assert mine["lease"] == lease
        for credential in (stack.keys["acme"]["viewer"], stack.keys["acme"]["admin"], another):
            async with bearer(stack.url, credential) as reader:
                seen = (await reader.get(f"/v1/tasks/{task_id}")).json()
                assert seen["lease"] == {"id": None, "expires_at": lease["expires_at"]}
                assert seen["status"] == "running" and seen["assigned_worker"] == "w1"
                listed = await reader.get("/v1/tasks", params={"queue": mine["queue"], "min_seq": str(mine["seq"])})
                assert [t["lease"] for t in listed.json()["items"]] == [{"id": None, "expires_at": lease["expires_at"]}]
        listed = await claimer.get("/v1/tasks", params={"queue": mine["queue"], "min_seq": str(mine["seq"])})
        assert [t["lease"]["id"] for t in listed.json()["items"]] == [lease["id"]]
