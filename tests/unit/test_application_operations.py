"""The application layer's operations called directly, on the in-memory event store (no HTTP, no
nats-server): routing a submission by the org's environments, asking for and deciding an approval,
signals, ending an attempt, and the typed errors each raises, which the gateway maps to the same
problem+json as before (``gateway.problems.describe``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from application.approvals import decide, find_approval
from application.bodies import ApprovalRequestBody, SubmitTaskBody
from application.environments import EnvironmentDirectory
from application.errors import PolicyUnavailable
from application.principal import Principal
from application.submit import route
from application.tasks import end_attempt, load_task, request_approval, signal
from core.domain.commands import Actor, ClaimTask, CompleteTask, DefineEnvironment, SubmitTask
from core.domain.errors import InvalidCommand, NotFound, NotPermitted, Rejected
from core.log.handler import CommandHandler
from core.log.memory_store import InMemoryEventStore
from gateway.problems import describe

ORG = "acme"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
ADMIN = Principal(ORG, Actor("ops", frozenset({"admin"})), "ops")
WORKER = Principal(ORG, Actor("key:w1", frozenset({"worker"})), "w1")
APPROVER = Principal(ORG, Actor("key:alice", frozenset({"approver"})), "alice")
VIEWER = Principal(ORG, Actor("key:vic", frozenset({"viewer"})), "vic")


def _ask(**fields: Any) -> ApprovalRequestBody:
    return ApprovalRequestBody(worker_id="w1", lease_id="l1", reason="roll out?", **fields)


FORM = {"type": "object", "properties": {"percent": {"type": "integer"}}, "required": ["percent"]}


def problem(error: Exception) -> tuple[int, str]:
    described = describe(error)
    assert described is not None, f"the gateway does not explain {error!r}"
    status, detail, _ = described
    return status, detail


def handler() -> CommandHandler:
    return CommandHandler(InMemoryEventStore(), clock=lambda: NOW)


async def claimed(commands: CommandHandler, task_id: str = "t1") -> None:
    await commands.handle(ORG, SubmitTask(task_id=task_id, task_type="deploy"), actor=ADMIN.actor)
    claim = ClaimTask(task_id=task_id, worker_id="w1", lease_id="l1", lease_seconds=30)
    await commands.handle(ORG, claim, actor=WORKER.actor)


async def test_a_submission_is_routed_by_the_org_environments_as_the_log_holds_them() -> None:
    store = InMemoryEventStore()
    commands = CommandHandler(store, clock=lambda: NOW)
    environments = EnvironmentDirectory(store)
    assert await route(environments, ORG, SubmitTaskBody(type="deploy")) == ("default", None)
    await commands.handle(ORG, DefineEnvironment(name="prod", queues=("deploys", "hotfix")), actor=ADMIN.actor)
    assert await route(environments, ORG, SubmitTaskBody(type="deploy", queue="hotfix")) == ("hotfix", "prod")
    assert await route(environments, ORG, SubmitTaskBody(type="deploy", environment="prod")) == ("deploys", "prod")
    with pytest.raises(InvalidCommand) as unknown:
        await route(environments, ORG, SubmitTaskBody(type="deploy", environment="staging"))
    assert problem(unknown.value) == (
        422,
        "environment staging is not defined in this org; GET /v1/environments lists them, or name a queue instead",
    )
    with pytest.raises(InvalidCommand) as outside:
        await route(environments, ORG, SubmitTaskBody(type="deploy", queue="default", environment="prod"))
    assert problem(outside.value)[0] == 422
    assert "queue default is not in environment prod (its queues: deploys, hotfix)" in problem(outside.value)[1]


async def test_an_approval_is_asked_and_decided_through_the_operations() -> None:
    commands = handler()
    await claimed(commands)
    approval, _ = await request_approval(commands, WORKER, "t1", _ask(form=FORM), command_id=None)
    assert approval.id == "t1-1"
    assert (await load_task(commands, ORG, "t1"))[0].status == "awaiting_approval"

    with pytest.raises(InvalidCommand) as unfit:
        await decide(commands, APPROVER, approval.id, "approve", comment=None, response={}, command_id=None)
    assert problem(unfit.value) == (
        422,
        "the response does not fit the approval's form: 'percent' is a required property (at $)",
    )
    decided, seq = await decide(
        commands, APPROVER, approval.id, "approve", comment="go", response={"percent": 5}, command_id="vote-1"
    )
    assert decided.status == "approved"
    again, same = await decide(
        commands, APPROVER, approval.id, "approve", comment="go", response={"percent": 5}, command_id="vote-1"
    )
    assert (again.status, same) == ("approved", seq)  # a retried decision is recorded once
    task, approval_now, _ = await find_approval(commands, ORG, approval.id)
    assert (task.status, approval_now.decisions[0].response) == ("pending", {"percent": 5})


async def test_an_attempt_ends_through_the_operation() -> None:
    commands = handler()
    await claimed(commands)
    command = CompleteTask(task_id="t1", worker_id="w1", lease_id="l1", result={"ok": True})
    outcome = await end_attempt(commands, WORKER, command, command_id=None)
    assert (outcome.state.status, outcome.state.result) == ("completed", {"ok": True})


@pytest.mark.parametrize(
    ("attempt", "status", "detail"),
    [
        ("decide-unknown", 404, "approval 'nope-1' not found"),
        ("decide-bad-id", 404, "approval 'NOPE' not found"),
        ("decide-as-viewer", 403, "this credential (roles ['viewer']) may not decide"),
        (
            "signal-as-viewer",
            403,
            "this credential (roles ['viewer']) may not signal: needs ['admin', 'approver', 'submitter']",
        ),
        ("load-unknown", 404, "task nope not found"),
        ("ask-too-much", 422, "details is 65561 bytes of JSON; the limit is 65536: attach less, or a link to it"),
    ],
)
async def test_each_refusal_is_a_typed_error_the_gateway_explains_as_before(
    attempt: str, status: int, detail: str
) -> None:
    commands = handler()
    await claimed(commands)
    operations = {
        "decide-unknown": lambda: decide(
            commands, APPROVER, "nope-1", "approve", comment=None, response=None, command_id=None
        ),
        "decide-bad-id": lambda: decide(
            commands, APPROVER, "NOPE", "approve", comment=None, response=None, command_id=None
        ),
        "decide-as-viewer": lambda: decide(
            commands, VIEWER, "t1-1", "approve", comment=None, response=None, command_id=None
        ),
        "signal-as-viewer": lambda: signal(commands, VIEWER, "t1", "go", {}, command_id=None),
        "load-unknown": lambda: load_task(commands, ORG, "nope"),
        "ask-too-much": lambda: request_approval(commands, WORKER, "t1", _ask(details="x" * 65_559), command_id=None),
    }
    with pytest.raises(Rejected) as refused:
        await operations[attempt]()
    assert isinstance(refused.value, NotFound | NotPermitted | InvalidCommand)
    assert problem(refused.value) == (status, detail)


def test_a_policy_that_cannot_decide_is_a_503_as_before() -> None:
    unavailable = PolicyUnavailable("the submit policy could not decide (boom); nothing was submitted")
    assert problem(unavailable) == (503, "the submit policy could not decide (boom); nothing was submitted")
