"""Runs: the org's tasks with filters and cursor paging, and one run in full: its timeline (what
``controlplane history`` prints), its workflow journal, approvals, result, and the task as it was at
any sequence of its log."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from application.tasks import load_task
from core.domain.commands import CancelTask, ResumeTask
from core.domain.events import EVENT_TYPES, TERMINAL_STATUSES, TaskStatus
from core.domain.history import state_at, why_absent
from core.domain.task import Task
from core.domain.timeline import TimelineEntry, task_timeline
from gateway.console.approvals import approval_view
from gateway.console.web import SignedIn, console_page, done, form_command_id, form_of, render
from gateway.http import path_id, query, services
from gateway.problems import Problem
from gateway.queries import Query, Seq, TaskList

PAGE_SIZE = 50
STATUSES = tuple(TaskStatus.__args__)  # type: ignore[attr-defined]
PRIORITIES = ("critical", "high", "normal", "low")
FILTERS = ("status", "queue", "workflow", "priority")
ALL_TYPES = ",".join(EVENT_TYPES)


class RunsQuery(TaskList, frozen=True):
    """The runs page's filters and page, parsed as ``GET /v1/tasks`` parses them."""

    def matches(self, task: Task) -> bool:
        workflow = task.workflow.name if task.workflow else None
        return all(
            wanted is None or wanted == actual
            for wanted, actual in (
                (self.status, task.status),
                (self.queue, task.queue),
                (self.workflow, workflow),
                (self.priority, task.priority),
            )
        )

    def filters(self, **extra: str) -> str:
        """The filters (not the page) as a query string, with ``extra`` parameters."""
        values = {name: getattr(self, name) for name in FILTERS if getattr(self, name)}
        return urlencode({**values, **extra})


class StateAtQuery(Query, frozen=True):
    at: Seq | None = None


@console_page
async def runs(request: Request, user: SignedIn) -> Response:
    svc = services(request)
    filters = query(request, RunsQuery)
    after = await svc.read_model.checkpoint("tasks")
    rows, next_cursor = await svc.read_model.list_tasks(
        user.who.org,
        status=filters.status,
        queue=filters.queue,
        priority=filters.priority,
        workflow=filters.workflow,
        limit=PAGE_SIZE,
        cursor=filters.cursor,
        newest_first=True,
    )
    return render(
        request,
        "tasks.html",
        {
            "tasks": [task for task, _ in rows],
            "filters": filters,
            "statuses": STATUSES,
            "priorities": PRIORITIES,
            "first_page": filters.cursor is None,
            "next_page": None if next_cursor is None else f"/console/tasks?{filters.filters(cursor=next_cursor)}",
            "after": after,
            "live_types": ALL_TYPES,
        },
        user=user,
    )


@console_page
async def row(request: Request, user: SignedIn) -> Response:
    """One run's row, fresh from the log, for the live list; 204 when it no longer matches the filters."""
    task, _ = await _task(request, user)
    if not query(request, RunsQuery).matches(task):
        return Response(status_code=204)
    return render(request, "task_row.html", {"task": task}, user=user)


@dataclass(frozen=True)
class JournalView:
    index: int
    kind: str
    name: str
    result: Any
    at: Any


@console_page
async def run(request: Request, user: SignedIn) -> Response:
    return await _run_page(request, user, "task.html")


@console_page
async def run_live(request: Request, user: SignedIn) -> Response:
    """The live parts of a run's page (status, actions, timeline, journal, approvals, result), for the
    page's script to swap in when the run's feed moves."""
    return await _run_page(request, user, "task_live.html")


async def _run_page(request: Request, user: SignedIn, template: str) -> Response:
    svc = services(request)
    task_id = path_id(request, "task_id", "task")
    history = await svc.handler.history(user.who.org, "task", task_id)
    task, seq = state_at(history)
    if task is None:
        raise Problem(404, f"task {task_id} not found")
    now = svc.clock()
    timeline: list[TimelineEntry] = task_timeline(history)
    return render(
        request,
        template,
        {
            "task": task,
            "seq": seq,
            "timeline": timeline,
            "journal": [JournalView(e.index, e.kind, e.name, e.result, e.at) for e in task.journal],
            "approvals": [approval_view(a, task, user, now) for a in task.approvals],
            "may_cancel": user.may("cancel") and task.status not in TERMINAL_STATUSES,
            "may_resume": user.may("admin") and task.parked,
            "state_at": _state_at_context(history, query(request, StateAtQuery).at),
            "action_key": secrets.token_urlsafe(16),
            "live_types": ALL_TYPES,
            "notice": request.query_params.get("notice"),
        },
        user=user,
    )


@console_page
async def state_at_fragment(request: Request, user: SignedIn) -> Response:
    task_id = path_id(request, "task_id", "task")
    history = await services(request).handler.history(user.who.org, "task", task_id)
    if not history:
        raise Problem(404, f"task {task_id} not found")
    context = _state_at_context(history, query(request, StateAtQuery).at)
    return render(request, "state_at.html", {"state_at": context, "task_id": task_id}, user=user)


def _state_at_context(history: list[Any], seq: int | None) -> dict[str, Any] | None:
    """The task as the log showed it when sequence ``seq`` was the newest, or why there was none yet."""
    if seq is None:
        return None
    task, folded = state_at(history, seq)
    if task is None:
        return {"requested": seq, "task": None, "folded": folded, "absent": why_absent(history, seq)}
    return {"requested": seq, "task": task, "folded": folded, "absent": None}


@console_page
async def cancel(request: Request, user: SignedIn) -> Response:
    form = await form_of(request)
    reason = form.get("reason")
    reason = reason.strip()[:4096] if isinstance(reason, str) and reason.strip() else None
    return await _command(request, user, "cancel", lambda task_id: CancelTask(task_id=task_id, reason=reason))


@console_page
async def resume(request: Request, user: SignedIn) -> Response:
    return await _command(request, user, "admin", lambda task_id: ResumeTask(task_id=task_id), scope="resume")


async def _command(
    request: Request, user: SignedIn, permission: str, command_of: Any, *, scope: str | None = None
) -> Response:
    """A task command by the signed-in person, with the API's roles, command path and idempotency."""
    user.who.require(permission)
    task, _ = await _task(request, user)
    form = await form_of(request)
    command_id = form_command_id(user, form, scope or permission, task.id)
    outcome = await services(request).handler.handle(
        user.who.org, command_of(task.id), actor=user.who.actor, command_id=command_id
    )
    page = f"/console/tasks/{task.id}"
    return done(request, page, f"{task.id} is now {outcome.state.status}", {"status": outcome.state.status})


async def _task(request: Request, user: SignedIn) -> tuple[Task, int]:
    return await load_task(services(request).handler, user.who.org, path_id(request, "task_id", "task"))
