"""The application layer without HTTP, on a real stack: a task submitted (policy gate, routing),
claimed from the claim index (at once, waiting, idempotently), asked about, decided and completed by
calling the operations on the gateway's own parts; what they wrote is what the API then shows. And a
refusal: the typed error an operation raises is what the API answers, as problem+json, status and
detail alike."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from application.approvals import decide
from application.bodies import ApprovalRequestBody, ClaimBody, SubmitTaskBody
from application.claim import Claim, claim_tasks
from application.policy import SPEND_FACTS, USAGE_FACTS, EngineInfo, SubmitGate
from application.principal import Principal
from application.tasks import end_attempt, request_approval
from core.domain.commands import Actor, CompleteTask
from core.domain.errors import Rejected
from core.domain.events import PolicyDecision
from core.domain.ids import new_id
from core.log.handler import Outcome
from gateway.problems import describe
from policies_wasm.budget import Budget, PolicyEvaluator
from policies_wasm.engine import SOURCES_DIR, Bundle
from tests.gateway.conftest import Stack, new_org


def principal(org: str, role: str) -> Principal:
    return Principal(org, Actor(f"app:{role}", frozenset({role})), f"app-{role}")


async def submitted(stack: Stack, org: str, queue: str, **fields: Any) -> Outcome:
    svc = stack.services
    spec = msgspec.convert({"type": "deploy", "queue": queue, **fields}, SubmitTaskBody)
    who = principal(org, "submitter")
    return await svc.submit_path.submit(org, spec, task_id=new_id(), actor=who.actor, command_id=None)


async def claimed(
    stack: Stack, org: str, queue: str, *, key: str | None = None, block_seconds: float = 0.0, max_tasks: int = 1
) -> list[Claim]:
    svc = stack.services
    return await claim_tasks(
        svc.handler,
        svc.claim_index,
        svc.idempotency,
        principal(org, "worker"),
        ClaimBody(worker_id="w1", queue=queue),
        max_tasks=max_tasks,
        block_seconds=block_seconds,
        key=key,
        clock=svc.clock,
    )


def client(stack: Stack, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=20)


async def test_submit_claim_ask_decide_and_complete_without_http(stack: Stack) -> None:
    org, keys = await new_org(stack)
    svc, worker = stack.services, principal(org, "worker")
    task = (await submitted(stack, org, "ops", payload={"service": "web"})).state
    assert task is not None and (task.status, task.queue) == ("pending", "ops")

    [first] = await claimed(stack, org, "ops")
    assert (first.task.id, first.task.status, first.task.lease.id) == (task.id, "running", first.lease_id)
    approval, _ = await request_approval(
        svc.handler,
        worker,
        task.id,
        ApprovalRequestBody(worker_id="w1", lease_id=first.lease_id, reason="ship it?", details={"plan": "v2"}),
        command_id=None,
    )
    decided, _ = await decide(
        svc.handler, principal(org, "approver"), approval.id, "approve", comment="fine", response=None, command_id=None
    )
    assert decided.status == "approved"

    [second] = await claimed(stack, org, "ops")  # an approved task is pending again, in the index at once
    done = await end_attempt(
        svc.handler,
        worker,
        CompleteTask(task_id=task.id, worker_id="w1", lease_id=second.lease_id, result={"shipped": True}),
        command_id=None,
    )
    assert done.state.status == "completed"
    async with client(stack, keys["viewer"]) as viewer:
        shown = (await viewer.get(f"/v1/tasks/{task.id}")).json()
    assert (shown["status"], shown["result"]) == ("completed", {"shipped": True})
    assert [a["status"] for a in shown["approvals"]] == ["approved"]


async def test_a_claim_waits_for_a_task_and_a_retried_claim_returns_the_original(stack: Stack) -> None:
    org, _ = await new_org(stack)
    waiting = asyncio.create_task(claimed(stack, org, "later", key="claim-1", block_seconds=5.0))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    task = (await submitted(stack, org, "later")).state
    [won] = await asyncio.wait_for(waiting, 5.0)
    assert won.task.id == task.id
    [again] = await claimed(stack, org, "later", key="claim-1")
    assert (again.task.id, again.lease_id, again.seq) == (won.task.id, won.lease_id, won.seq)
    assert await claimed(stack, org, "later") == []  # nothing else to claim: empty at once, not an error


@pytest.mark.parametrize(
    ("name", "http", "operation"),
    [
        (
            "an undefined environment",
            ("POST", "/v1/tasks", "submitter", {"type": "deploy", "environment": "nowhere"}),
            lambda stack, org: submitted(stack, org, "ops", environment="nowhere"),
        ),
        (
            "a role that may not submit",
            ("POST", "/v1/tasks", "viewer", {"type": "deploy"}),
            lambda stack, org: stack.services.submit_path.submit(
                org,
                msgspec.convert({"type": "deploy"}, SubmitTaskBody),
                task_id=new_id(),
                actor=principal(org, "viewer").actor,
                command_id=None,
            ),
        ),
        (
            "an unknown approval",
            ("POST", "/v1/approvals/nope-1/approve", "approver", {}),
            lambda stack, org: decide(
                stack.services.handler,
                principal(org, "approver"),
                "nope-1",
                "approve",
                comment=None,
                response=None,
                command_id=None,
            ),
        ),
    ],
)
async def test_an_operations_typed_error_is_the_problem_the_api_answers(
    stack: Stack, name: str, http: tuple[str, str, str, dict[str, Any]], operation: Any
) -> None:
    org, keys = await new_org(stack)
    with pytest.raises(Rejected) as refused:
        await operation(stack, org)
    described = describe(refused.value)
    assert described is not None, name
    method, path, role, body = http
    async with client(stack, keys[role]) as caller:
        answered = await caller.request(method, path, json=body)
    assert answered.headers["content-type"] == "application/problem+json"
    assert (answered.status_code, answered.json()["detail"]) == described[:2], name


@contextlib.asynccontextmanager
async def gate_deciding_with(stack: Stack, bundle: Bundle) -> AsyncIterator[SubmitGate]:
    """A submit gate on the stack's parts for which ``bundle`` is the shipped one, with an evaluator of its
    own: its ``remembered`` counts this test's decisions only."""
    svc = stack.services
    evaluator = PolicyEvaluator(Budget(ms=2000, workers=1))
    try:
        engine = await evaluator.prepare(bundle)
        yield SubmitGate(bundle, EngineInfo(engine), evaluator, svc.handler, svc.claim_index, svc.read_model)
    finally:
        evaluator.close()


async def gate_decides(gate: SubmitGate, org: str) -> PolicyDecision:
    decision, _ = await gate.decide(
        org, task_type="deploy", payload={}, metadata={}, workflow=None, queue="ops", environment=None
    )
    return decision


async def test_the_submit_gate_gives_the_policy_only_the_usage_its_quotas_read(stack: Stack) -> None:
    free, _ = await new_org(stack)
    capped, _ = await new_org(stack)
    shipped = Bundle.from_dir(SOURCES_DIR)
    data = copy.deepcopy(shipped.data)
    data["policy_config"]["orgs"] = {capped: {"settings": {"max_tasks_in_flight_per_org": 2}}}
    in_flight = stack.services.claim_index.in_flight
    async with gate_deciding_with(stack, shipped.with_data(data)) as gate:
        for count in range(3):
            assert in_flight(free) == count
            assert (await gate_decides(gate, free)).allows
            await submitted(stack, free, "ops")  # through the stack's own gate, which sets no quota
        # The first submit asked which usage it reads, then decided; the later ones, each at another
        # in-flight count, were both answered from memory.
        assert gate.evaluator.remembered == 4

        for count in range(2):
            assert in_flight(capped) == count
            assert (await gate_decides(gate, capped)).allows
            await submitted(stack, capped, "ops")
        at_limit = await gate_decides(gate, capped)
        assert (at_limit.allows, at_limit.reasons) == (False, ["tasks in flight for the org: 2 in use, limit 2"])
        assert gate.evaluator.remembered == 4 + 2  # only "which usage" repeated: each count is a new question


ECHO_USAGE = """package controlplane

import rego.v1

# METADATA
# entrypoint: true
submit := {"allow": true, "require_approval": false, "reasons": sort(object.keys(input.usage))}
"""


@pytest.mark.parametrize(
    ("declaration", "given"),
    [
        pytest.param(None, sorted(USAGE_FACTS), id="a bundle written before the declaration gets every fact"),
        pytest.param(
            'submit_usage := ["tokens_today", "org_in_flight"]', ["org_in_flight", "tokens_today"], id="named"
        ),
        pytest.param("submit_usage := []", [], id="none named: the spend is not even read"),
        pytest.param("submit_usage := input.nothing", sorted(USAGE_FACTS), id="undefined: every fact"),
        pytest.param('submit_usage := "tokens_today"', sorted(USAGE_FACTS), id="not a list: every fact"),
    ],
)
async def test_the_usage_a_bundle_declares_is_the_usage_its_submit_decision_sees(
    stack: Stack, declaration: str | None, given: list[str]
) -> None:
    org, _ = await new_org(stack)
    source = ECHO_USAGE if declaration is None else f"{ECHO_USAGE}\n# METADATA\n# entrypoint: true\n{declaration}\n"
    async with gate_deciding_with(stack, Bundle(modules={"echo.rego": source})) as gate:
        assert (await gate_decides(gate, org)).reasons == given
        assert (org in gate._spend) == bool(SPEND_FACTS.intersection(given)), "the spend is read when it is given"
