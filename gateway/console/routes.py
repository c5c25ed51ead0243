"""The console's routes, in one place; the gateway mounts them beside the API."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.console import approvals, overview, schedules, signin, tasks

ROUTES: list[BaseRoute] = [
    Route("/", signin.root, methods=["GET"]),
    Route("/console", signin.signin_page, methods=["GET"]),
    Route("/console/sign-in", signin.sign_in, methods=["POST"]),
    Route("/console/sign-out", signin.sign_out, methods=["POST"]),
    Route("/console/approvals", approvals.inbox, methods=["GET"]),
    Route("/console/approvals/{approval_id}/row", approvals.row, methods=["GET"]),
    Route("/console/approvals/{approval_id}/approve", approvals.approve, methods=["POST"]),
    Route("/console/approvals/{approval_id}/reject", approvals.reject, methods=["POST"]),
    Route("/console/tasks", tasks.runs, methods=["GET"]),
    Route("/console/tasks/{task_id}", tasks.run, methods=["GET"]),
    Route("/console/tasks/{task_id}/live", tasks.run_live, methods=["GET"]),
    Route("/console/tasks/{task_id}/row", tasks.row, methods=["GET"]),
    Route("/console/tasks/{task_id}/state", tasks.state_at_fragment, methods=["GET"]),
    Route("/console/tasks/{task_id}/cancel", tasks.cancel, methods=["POST"]),
    Route("/console/tasks/{task_id}/resume", tasks.resume, methods=["POST"]),
    Route("/console/workers", overview.workers, methods=["GET"]),
    Route("/console/usage", overview.usage, methods=["GET"]),
    Route("/console/schedules", schedules.schedules, methods=["GET"]),
    Route("/console/schedules/{schedule_id}/pause", schedules.pause, methods=["POST"]),
    Route("/console/schedules/{schedule_id}/resume", schedules.resume, methods=["POST"]),
    Route("/console/policies", overview.policies, methods=["GET"]),
    Mount("/console/static", StaticFiles(packages=[("gateway.console", "static")]), name="console-static"),
]
