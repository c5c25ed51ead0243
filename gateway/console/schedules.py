"""The org's schedules (cron): each one's cron, time zone, next fire and last run, with pause and resume
buttons that go through the same functions as ``POST /v1/schedules/{id}/pause|resume``."""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import Response

from gateway.console.web import SignedIn, console_page, done, form_command_id, form_of, render
from gateway.http import path_id, services
from gateway.schedules import PERMISSION, current, set_paused


@console_page
async def schedules(request: Request, user: SignedIn) -> Response:
    user.who.require(PERMISSION)
    rows = await services(request).read_model.list_schedules(user.who.org)
    return render(
        request,
        "schedules.html",
        {"schedules": [schedule for schedule, _ in rows], "action_key": secrets.token_urlsafe(16)},
        user=user,
    )


@console_page
async def pause(request: Request, user: SignedIn) -> Response:
    return await _set_paused(request, user, True)


@console_page
async def resume(request: Request, user: SignedIn) -> Response:
    return await _set_paused(request, user, False)


async def _set_paused(request: Request, user: SignedIn, paused: bool) -> Response:
    user.who.require(PERMISSION)
    svc = services(request)
    schedule, _ = await current(svc, user.who.org, path_id(request, "schedule_id", "schedule"))
    form = await form_of(request)
    verb = "pause" if paused else "resume"
    outcome = await set_paused(svc, user.who, schedule.id, paused, form_command_id(user, form, verb, schedule.id))
    state = "paused" if outcome.state.paused else "active"
    return done(request, "/console/schedules", f"schedule {schedule.id} is {state}", {"paused": outcome.state.paused})
