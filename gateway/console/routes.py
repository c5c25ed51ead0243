"""The console's routes, in one place; the gateway mounts them beside the API. They are pages, not part of
the API: /openapi.json leaves them out (include_in_schema=False)."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.console import approvals, overview, schedules, signin, tasks

ROUTES: list[BaseRoute] = [
    Route("/", signin.root, methods=["GET"], include_in_schema=False),
    Route("/console", signin.signin_page, methods=["GET"], include_in_schema=False),
    Route("/console/sign-in", signin.sign_in, methods=["POST"], include_in_schema=False),
    Route("/console/sign-out", signin.sign_out, methods=["POST"], include_in_schema=False),
    Route("/console/approvals", approvals.inbox, methods=["GET"], include_in_schema=False),
    Route("/console/approvals/{approval_id}/row", approvals.row, methods=["GET"], include_in_schema=False),
    Route("/console/approvals/{approval_id}/approve", approvals.approve, methods=["POST"], include_in_schema=False),
    Route("/console/approvals/{approval_id}/reject", approvals.reject, methods=["POST"], include_in_schema=False),
    Route("/console/tasks", tasks.runs, methods=["GET"], include_in_schema=False),
    Route("/console/tasks/{task_id}", tasks.run, methods=["GET"], include_in_schema=False),
    Route("/console/tasks/{task_id}/live", tasks.run_live, methods=["GET"], include_in_schema=False),
    Route("/console/tasks/{task_id}/row", tasks.row, methods=["GET"], include_in_schema=False),
    Route("/console/tasks/{task_id}/state", tasks.state_at_fragment, methods=["GET"], include_in_schema=False),
    Route("/console/tasks/{task_id}/cancel", tasks.cancel, methods=["POST"], include_in_schema=False),
    Route("/console/tasks/{task_id}/resume", tasks.resume, methods=["POST"], include_in_schema=False),
    Route("/console/workers", overview.workers, methods=["GET"], include_in_schema=False),
    Route("/console/usage", overview.usage, methods=["GET"], include_in_schema=False),
    Route("/console/schedules", schedules.schedules, methods=["GET"], include_in_schema=False),
    Route("/console/schedules/{schedule_id}/pause", schedules.pause, methods=["POST"], include_in_schema=False),
    Route("/console/schedules/{schedule_id}/resume", schedules.resume, methods=["POST"], include_in_schema=False),
    Route("/console/policies", overview.policies, methods=["GET"], include_in_schema=False),
    Mount("/console/static", StaticFiles(packages=[("gateway.console", "static")]), name="console-static"),
]
