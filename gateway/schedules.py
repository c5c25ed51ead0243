"""Schedules (cron): ``POST /v1/schedules`` and the rest, and ``run_fire``, the one place a fire (the
scheduler's, or a trigger's) becomes a task.

A fire submits its schedule's task through the API's own submit path (``application.submit``:
environments, the submit policy, workflow pinning) as the actor ``schedule:<id>``, with
``metadata.schedule_id`` and ``metadata.schedule_fire_at``, after recording the run: the record is the
decision, the log's concurrency check makes it on the schedule as it is, and the submit carries it out.
Every id it uses derives from the schedule, its generation and the fire time: run again after a crash, a
fire finds its own record and task and submits nothing twice. Every schedule endpoint needs admin or
submitter (permission ``schedule``). Single schedules are read from the log; the list from the
``schedules`` read model."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from datetime import datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from application.bodies import ScheduleBody, SubmitTaskBody
from application.errors import PolicyUnavailable
from application.idempotency import derived_id
from application.principal import Principal
from application.submit import denial_reasons, route
from core.domain.commands import (
    Actor,
    CancelTask,
    CreateSchedule,
    DeleteSchedule,
    PauseSchedule,
    RecordScheduleRun,
    ResumeSchedule,
    SubmitTask,
)
from core.domain.errors import AlreadyExists, AlreadyTerminal, ConcurrencyExhausted, Rejected
from core.domain.events import ScheduleRunOutcome, ScheduleRunRecorded
from core.domain.ids import new_id
from core.domain.schedules import (
    SCHEDULE_AGGREGATE,
    SUBMITTING_OUTCOMES,
    FireNotDue,
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

log = logging.getLogger(__name__)

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
    try:
        return await run_fire(
            svc, who.org, schedule, fire_at, generation=schedule.generation, task_id=task_id, manual=True
        )
    except FireNotDue as exc:
        raise Problem(409, f"{exc.detail}; trigger it again") from exc
    except Transient as exc:
        raise Problem(503, f"the run could not be decided now ({exc}); trigger it again later") from exc


# --- a fire's run -----------------------------------------------------------------------------------


class Transient(Exception):
    """The run could not be decided now (the policy engine or a dependency is unavailable): the fire
    stays due and the scheduler retries it."""


async def run_fire(
    svc: Services,
    org: str,
    schedule: Schedule,
    fire_at: datetime,
    *,
    generation: int,
    task_id: str,
    manual: bool = False,
) -> Outcome:
    """Run one fire of ``schedule`` (a copy of it, possibly behind the log): decide by its overlap
    policy what the run does, record that (``RecordScheduleRun``), then do it (:func:`_carry_out`).

    The record comes first because the log decides it on the schedule as it is: a fire that a pause,
    a deletion or another gateway's run got to first is refused (``FireNotDue`` is raised) and
    nothing was cancelled or submitted for it. A denial is appended before its record (it submits
    nothing that could run). Idempotent: every command's id derives from ``task_id``; a run recorded
    by an earlier attempt is answered as recorded and carried out again, which changes nothing that
    was done."""
    previous = None
    if schedule.overlap != "allow" and schedule.last_task_id not in (None, task_id):
        previous, _ = await svc.handler.load(org, "task", schedule.last_task_id)
    previous_open = previous is not None and not previous.is_terminal
    action = overlap_action(schedule.overlap, previous_open=previous_open)
    outcome: ScheduleRunOutcome = "submitted"
    reason: str | None = None
    cancelled: str | None = None
    submitted_id: str | None = task_id
    command: SubmitTask | None = None
    if action == "skip":
        assert previous is not None
        outcome, submitted_id = "skipped", None
        reason = f"the previous run {previous.id} is still {previous.status}"
    else:
        try:
            command = await _submission(svc, org, schedule, fire_at, task_id)
        except _Unsubmittable as exc:
            outcome, reason, submitted_id = "failed", exc.reason, None
        else:
            if command.policy is not None and not command.policy.allows:
                denied = await _append_submission(svc, org, schedule, command)
                reasons = "; ".join(denial_reasons(denied))
                outcome, reason, submitted_id = "denied", f"the submit policy denied the task: {reasons}", None
            elif action == "cancel_then_submit":
                assert previous is not None
                outcome, cancelled = "cancelled_previous", previous.id
    record = RecordScheduleRun(
        schedule_id=schedule.id,
        fire_at=fire_at,
        generation=generation,
        task_id=submitted_id,
        outcome=outcome,
        reason=None if reason is None else reason[:4096],
        cancelled_task_id=cancelled,
        manual=manual,
    )
    recorded = await svc.handler.handle(
        org, record, actor=SCHEDULER_ACTOR, command_id=_run_command_id(task_id), causation_id=task_id
    )
    await _carry_out(svc, org, recorded, command)
    return recorded


async def finish_run(svc: Services, org: str, schedule_id: str, task_id: str) -> bool:
    """Carry out the run an earlier attempt recorded for the fire whose task is ``task_id`` and
    stopped before doing (a crash between the record and the submit). False if no run is recorded.
    The schedule is taken as the handler last read it: the caller has just read it from the log."""
    command_id = _run_command_id(task_id)
    recorded = await svc.handler.outcome_of(org, SCHEDULE_AGGREGATE, schedule_id, command_id, refresh=False)
    if recorded is None:
        return False
    await _carry_out(svc, org, recorded, None)
    return True


def _run_command_id(task_id: str) -> str:
    return derived_id(task_id, "schedule-run")


async def _carry_out(svc: Services, org: str, recorded: Outcome, prepared: SubmitTask | None) -> None:
    """Do what a recorded run says: cancel the previous run, submit the task (``prepared``, when it is
    the one the record names). Each command's id derives from the run's task id, so doing it again
    appends nothing."""
    run = recorded.events[0].event
    assert isinstance(run, ScheduleRunRecorded)
    if run.outcome not in SUBMITTING_OUTCOMES or run.task_id is None:
        return
    schedule: Schedule = recorded.state
    if run.cancelled_task_id is not None:
        await _cancel_previous(svc, org, schedule, run.cancelled_task_id, run.task_id)
    command = prepared
    if command is None or command.task_id != run.task_id:
        try:
            command = await _submission(svc, org, schedule, run.fire_at, run.task_id)
        except _Unsubmittable as exc:  # it could be submitted when the run was recorded: a change since
            log.error("schedule %s: the run it recorded cannot be submitted now: %s", schedule.id, exc.reason)
            return
    await _append_submission(svc, org, schedule, command)


async def _cancel_previous(svc: Services, org: str, schedule: Schedule, previous_id: str, task_id: str) -> None:
    reason = f"schedule {schedule.id} started a new run ({task_id}) and its overlap policy is cancel_previous"
    with contextlib.suppress(AlreadyTerminal):  # it ended meanwhile: nothing to cancel
        await svc.handler.handle(
            org,
            CancelTask(task_id=previous_id, reason=reason),
            actor=schedule_actor(schedule.id),
            command_id=derived_id(task_id, "schedule-cancel-previous"),
        )


class _Unsubmittable(Exception):
    """The schedule's task cannot be submitted (it cannot be routed or is invalid): the run fails."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _submission(svc: Services, org: str, schedule: Schedule, fire_at: datetime, task_id: str) -> SubmitTask:
    """The submit command of the fire's task (routed, decided by the submit policy), as the schedule's
    actor submits it, with ``metadata.schedule_id`` and ``metadata.schedule_fire_at``."""
    try:
        spec = msgspec.convert(schedule.task, SubmitTaskBody)
        metadata = {**spec.metadata, "schedule_id": schedule.id, "schedule_fire_at": fire_at.isoformat()}
        spec = msgspec.structs.replace(spec, metadata=metadata)
        return await svc.submit_path.prepare(org, spec, task_id=task_id, actor=schedule_actor(schedule.id))
    except PolicyUnavailable as exc:
        raise Transient(exc.detail) from exc
    except (Rejected, msgspec.ValidationError) as exc:
        raise _Unsubmittable(str(exc)) from exc


async def _append_submission(svc: Services, org: str, schedule: Schedule, command: SubmitTask) -> Outcome:
    try:
        return await svc.handler.handle(
            org,
            command,
            actor=schedule_actor(schedule.id),
            command_id=derived_id(command.task_id, "schedule-submit"),
        )
    except ConcurrencyExhausted as exc:
        raise Transient(exc.detail) from exc
