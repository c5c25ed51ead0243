"""Schedules (cron): ``POST /v1/schedules`` and the rest, and ``run_fire``, the one place a fire (the
scheduler's, or a trigger's) becomes a task.

A fire submits its schedule's task through the API's own submit path (``application.submit.submit_task``:
environments, the submit policy, workflow pinning) as the actor ``schedule:<id>``, with
``metadata.schedule_id`` and ``metadata.schedule_fire_at``. Every id it uses derives from the
schedule, its generation and the fire time: run again after a crash, a fire finds its own task and
submits nothing twice. Every schedule endpoint needs admin or submitter (permission ``schedule``).
Single schedules are read from the log; the list from the ``schedules`` read model."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from application.bodies import ScheduleBody, SubmitTaskBody
from application.errors import PolicyUnavailable
from application.idempotency import derived_id
from application.principal import Principal
from application.submit import denial_reasons, route, submit_task
from core.domain.commands import (
    Actor,
    CancelTask,
    CreateSchedule,
    DeleteSchedule,
    PauseSchedule,
    RecordScheduleRun,
    ResumeSchedule,
)
from core.domain.errors import AlreadyExists, AlreadyTerminal, ConcurrencyExhausted, Rejected
from core.domain.events import ScheduleRunOutcome
from core.domain.ids import new_id
from core.domain.schedules import (
    SCHEDULE_AGGREGATE,
    InvalidSchedule,
    Schedule,
    check_cron,
    overlap_action,
    run_task_id,
)
from core.log.handler import Outcome
from gateway.http import body, command_id, idempotency_key, json, path_id, principal, read_after, services
from gateway.problems import Problem
from gateway.services import Services

PERMISSION = "schedule"
SCHEDULER_ACTOR = Actor(id="system:scheduler", roles=frozenset({"admin"}))
"""Who records a fire's run (the scheduler is the system, not the schedule's author)."""
RESERVED_METADATA = ("schedule_id", "schedule_fire_at")
MAX_TASK_METADATA = 64 - len(RESERVED_METADATA)


def schedule_actor(schedule_id: str) -> Actor:
    """Who submits a schedule's tasks: a submitter named after the schedule, whoever created it."""
    return Actor(id=f"schedule:{schedule_id}", roles=frozenset({"submitter"}))


def schedule_document(schedule: Schedule, seq: int) -> dict[str, Any]:
    return {
        "id": schedule.id,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "task": schedule.task,
        "overlap": schedule.overlap,
        "paused": schedule.paused,
        "next_fire_at": schedule.next_fire_at,
        "last_task_id": schedule.last_task_id,
        "last_fire_at": schedule.last_fire_at,
        "last_outcome": schedule.last_outcome,
        "last_reason": schedule.last_reason,
        "runs": schedule.runs,
        "skipped": schedule.skipped,
        "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
        "created_by": schedule.created_by,
        "seq": seq,
    }


# --- routes ---------------------------------------------------------------------------------------


async def create(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    spec = await body(request, ScheduleBody)
    svc = services(request)
    try:
        check_cron(spec.cron, spec.timezone)
    except InvalidSchedule as exc:
        raise Problem(422, exc.detail) from exc
    if len(spec.task.metadata) > MAX_TASK_METADATA:
        raise Problem(
            422,
            f"task.metadata has {len(spec.task.metadata)} keys; a scheduled task's holds at most {MAX_TASK_METADATA}",
        )
    # A task that could never be routed is refused now, not at each fire.
    await route(svc.environments, who.org, spec.task)
    key = idempotency_key(request)
    schedule_id = spec.id or (new_id() if key is None else derived_id(who.org, who.credential_id, key, "schedule"))
    fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
    command = CreateSchedule(
        schedule_id=schedule_id,
        cron=spec.cron,
        timezone=spec.timezone,
        task=msgspec.to_builtins(spec.task),
        overlap=spec.overlap,
        paused=spec.paused,
    )
    try:
        outcome = await svc.handler.handle(
            who.org, command, actor=who.actor, command_id=command_id(request, who, "schedule", fingerprint)
        )
    except AlreadyExists as exc:
        raise Problem(
            409,
            f"schedule {schedule_id} already exists (or this Idempotency-Key was used with another body); "
            f"delete it first with DELETE /v1/schedules/{schedule_id}",
        ) from exc
    return json(schedule_document(outcome.state, outcome.seq), 201)


async def list_schedules(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    await read_after(request, "schedules", who)
    rows = await services(request).read_model.list_schedules(who.org)
    return json({"items": [schedule_document(schedule, seq) for schedule, seq in rows]})


async def get_schedule(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    schedule, seq = await current(services(request), who.org, path_id(request, "schedule_id", "schedule"))
    return json(schedule_document(schedule, seq))


async def delete(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    schedule_id = path_id(request, "schedule_id", "schedule")
    await services(request).handler.handle(
        who.org,
        DeleteSchedule(schedule_id=schedule_id),
        actor=who.actor,
        command_id=command_id(request, who, "schedule-delete", schedule_id),
    )
    return Response(status_code=204)


async def pause(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    schedule_id = path_id(request, "schedule_id", "schedule")
    outcome = await set_paused(
        services(request), who, schedule_id, True, command_id(request, who, "pause", schedule_id)
    )
    return json(schedule_document(outcome.state, outcome.seq))


async def resume(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    schedule_id = path_id(request, "schedule_id", "schedule")
    outcome = await set_paused(
        services(request), who, schedule_id, False, command_id(request, who, "resume", schedule_id)
    )
    return json(schedule_document(outcome.state, outcome.seq))


async def trigger(request: Request) -> Response:
    """Run the schedule now, as a fire would (its overlap policy applies), paused or not."""
    who = await principal(request, PERMISSION)
    schedule_id = path_id(request, "schedule_id", "schedule")
    outcome = await trigger_now(services(request), who, schedule_id, idempotency_key(request))
    return json(schedule_document(outcome.state, outcome.seq))


# --- what the API and the console share ------------------------------------------------------------


async def current(svc: Services, org: str, schedule_id: str) -> tuple[Schedule, int]:
    """The schedule as the log holds it now; 404 if there is none (or it was deleted)."""
    state, seq = await svc.handler.load(org, SCHEDULE_AGGREGATE, schedule_id)
    if state is None or state.deleted:
        raise Problem(404, f"schedule {schedule_id} not found")
    return state, seq


async def set_paused(svc: Services, who: Principal, schedule_id: str, paused: bool, command: str | None) -> Outcome:
    kind = PauseSchedule if paused else ResumeSchedule
    return await svc.handler.handle(who.org, kind(schedule_id=schedule_id), actor=who.actor, command_id=command)


async def trigger_now(svc: Services, who: Principal, schedule_id: str, key: str | None) -> Outcome:
    schedule, _ = await current(svc, who.org, schedule_id)
    fire_at = svc.clock()
    if key is None:
        task_id = run_task_id(who.org, schedule_id, schedule.generation, fire_at)
    else:  # the same key runs the same manual fire, once
        task_id = derived_id(who.org, who.credential_id, key, "schedule-trigger", schedule_id, str(schedule.generation))
    return await run_fire(svc, who.org, schedule, fire_at, task_id=task_id, manual=True)


# --- a fire's run -----------------------------------------------------------------------------------


class Transient(Exception):
    """The run could not be decided now (the policy engine or a dependency is unavailable): the fire
    stays pending and the scheduler retries it."""


async def run_fire(
    svc: Services, org: str, schedule: Schedule, fire_at: datetime, *, task_id: str, manual: bool = False
) -> Outcome:
    """Run one fire of ``schedule``: by its overlap policy submit its task as ``task_id`` (cancelling
    the previous run first for ``cancel_previous``), or skip; then record the run. Idempotent: every
    command's id derives from ``task_id``, and a task already submitted as ``task_id`` (by an earlier
    attempt that did not get to record) counts as this fire's run."""
    previous_id = schedule.last_task_id
    outcome: ScheduleRunOutcome = "submitted"
    reason: str | None = None
    cancelled: str | None = None
    submitted_id: str | None = task_id
    previous = None
    if schedule.overlap != "allow" and previous_id is not None and previous_id != task_id:
        previous, _ = await svc.handler.load(org, "task", previous_id)
    previous_open = previous is not None and not previous.is_terminal
    # An earlier attempt at this fire may have submitted before it could record: then that task is this
    # fire's run, whatever the previous one is doing. (Without an open previous run the submit below is
    # that check: its command id is the earlier attempt's, so the handler answers the original outcome.)
    already = (await svc.handler.load(org, "task", task_id))[0] if previous_open else None
    if already is None:
        action = overlap_action(schedule.overlap, previous_open=previous_open)
        if action == "skip":
            assert previous is not None
            outcome, submitted_id = "skipped", None
            reason = f"the previous run {previous.id} is still {previous.status}"
        else:
            if action == "cancel_then_submit":
                assert previous is not None
                cancelled = await _cancel_previous(svc, org, schedule, previous.id, task_id)
            outcome, reason, submitted_id = await _submit_run(svc, org, schedule, fire_at, task_id)
            if outcome == "submitted" and cancelled is not None:
                outcome = "cancelled_previous"
    record = RecordScheduleRun(
        schedule_id=schedule.id,
        fire_at=fire_at,
        task_id=submitted_id,
        outcome=outcome,
        reason=None if reason is None else reason[:4096],
        cancelled_task_id=cancelled,
        manual=manual,
    )
    return await svc.handler.handle(
        org, record, actor=SCHEDULER_ACTOR, command_id=derived_id(task_id, "schedule-run"), causation_id=task_id
    )


async def _cancel_previous(svc: Services, org: str, schedule: Schedule, previous_id: str, task_id: str) -> str | None:
    reason = f"schedule {schedule.id} started a new run ({task_id}) and its overlap policy is cancel_previous"
    try:
        await svc.handler.handle(
            org,
            CancelTask(task_id=previous_id, reason=reason),
            actor=schedule_actor(schedule.id),
            command_id=derived_id(task_id, "schedule-cancel-previous"),
        )
    except AlreadyTerminal:  # it ended meanwhile: nothing to cancel
        return None
    return previous_id


async def _submit_run(
    svc: Services, org: str, schedule: Schedule, fire_at: datetime, task_id: str
) -> tuple[ScheduleRunOutcome, str | None, str | None]:
    """(outcome, reason, task id submitted) of submitting the schedule's task for the fire."""
    try:
        spec = msgspec.convert(schedule.task, SubmitTaskBody)
        metadata = {**spec.metadata, "schedule_id": schedule.id, "schedule_fire_at": fire_at.isoformat()}
        spec = msgspec.structs.replace(spec, metadata=metadata)
        submitted = await submit_task(
            svc.handler,
            svc.submit_gate,
            svc.environments,
            svc.read_model,
            org,
            spec,
            task_id=task_id,
            actor=schedule_actor(schedule.id),
            command_id=derived_id(task_id, "schedule-submit"),
        )
    except (PolicyUnavailable, ConcurrencyExhausted) as exc:
        raise Transient(exc.detail) from exc
    except (Rejected, msgspec.ValidationError) as exc:
        return "failed", str(exc), None
    if submitted.state is None:
        return "denied", "the submit policy denied the task: " + "; ".join(denial_reasons(submitted)), None
    return "submitted", None, task_id
