"""The approvals read model keeps what was asked (details, form) and every answer (responses) exactly as
the log folds them, live and after a rebuild."""

from __future__ import annotations

import asyncpg
import pytest

from core.domain.commands import DecideApproval, RequestApproval
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from projections.projector import Projector
from projections.read import ReadModel
from projections.rebuild import rebuild
from tests.integration.test_projections import (
    APPROVERS,
    WORKER,
    caught_up,
    claim,
    handle,
    running,
    snapshot,
    submit,
)

pytestmark = pytest.mark.integration

FORM = {"type": "object", "properties": {"percent": {"type": "integer"}}, "required": ["percent"]}
ASKED = [  # details, form, the responses of two approvals
    ({"plan": "- build\n- ship", "tool_call": {"name": "deploy", "arguments": {"n": 2**70, "x": 1.5}}}, FORM),
    (["-old line", "+new line"], None),
    ("a\x00nul in the details", {"type": "string"}),  # PostgreSQL stores a stand-in; see test_projections
    (None, None),
]
ANSWERS = [{"percent": 10, "why": "canary ✓"}, [1, None, "two"], "fine", None]


async def test_details_forms_and_responses_are_kept_live_and_by_a_rebuild(
    handler: CommandHandler,
    org: str,
    pool: asyncpg.Pool,
    projector: Projector,
    store: JetStreamEventStore,
    read_model: ReadModel,
) -> None:
    async with running(projector):
        for n, ((details, form), answer) in enumerate(zip(ASKED, ANSWERS, strict=True)):
            task_id = f"t{n}"
            await submit(handler, org, task_id)
            await claim(handler, org, task_id)
            request = RequestApproval(
                task_id=task_id,
                worker_id="w1",
                lease_id="l1",
                approval_id=f"{task_id}-1",
                reason="ship?",
                quorum=2,
                details=details,
                form=form,
            )
            await handle(handler, org, request, WORKER)
            for approver in APPROVERS[: 1 + n % 2]:
                vote = DecideApproval(task_id=task_id, approval_id=f"{task_id}-1", decision="approve", response=answer)
                await handle(handler, org, vote, approver)
        await caught_up(projector)

    for n in (0, 1, 3):  # the NUL one shows a stand-in in the read model, by design
        task, seq = await handler.load(org, "task", f"t{n}")
        assert await read_model.get_approval(org, f"t{n}-1") == (task.approvals[0], seq)
        assert await read_model.get_task(org, f"t{n}") == (task, seq)
    listed, _ = await read_model.list_approvals(org)
    by_id = {approval.id: approval for approval, _ in listed}
    assert (by_id["t0-1"].details, by_id["t0-1"].form) == ASKED[0]
    assert [v.response for v in by_id["t1-1"].decisions] == [ANSWERS[1], ANSWERS[1]]
    assert by_id["t1-1"].status == "approved"

    live = await snapshot(pool, org)
    await rebuild(pool, store.nc, None, lambda done, total: None, consumer_prefix=projector.consumer_prefix)
    assert await snapshot(pool, org) == live
