"""The API's own description, generated from the route table.

Each route of the API is an :class:`ApiRoute`: besides its path, method and endpoint it declares what
``/openapi.json`` says of it (summary, permission, body type, success status, query parameters).
:func:`openapi_document` walks the routes and refuses a route that declares nothing, so the document
cannot drift from what is served: a route is either an ``ApiRoute`` or marked ``include_in_schema=False``
(the console's pages)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from gateway.http import json

PUBLIC = None
"""The permission of a route anyone may call, without a credential."""

_ERRORS = {
    "400": "Malformed body",
    "401": "No or invalid credential",
    "403": "Role not allowed",
    "404": "Unknown object or another org's",
    "409": "State does not allow the command",
    "413": "Body too large",
    "422": "Invalid field values",
    "429": "Rate limited",
    "503": "A dependency is unavailable",
}
_PROBLEM = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}
_IDEMPOTENT_METHODS = {"POST", "PUT"}
"""Methods whose requests take an ``Idempotency-Key``."""


@dataclass(frozen=True, kw_only=True)
class Operation:
    """What the document says of one route."""

    summary: str
    permission: str | None
    """Who may call it (a role's permission, or a phrase); ``PUBLIC`` (None): no credential needed."""
    body: type | None = None
    body_required: bool = True
    """False for a body that may be left out (the route then takes its defaults)."""
    success: int = 200
    query: tuple[str, ...] = ()
    """The query parameters the route reads."""


class ApiRoute(Route):
    """A route of the API: one method, and the :class:`Operation` the document describes it by."""

    def __init__(
        self,
        method: str,
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
        summary: str,
        *,
        permission: str | None,
        body: type | None = None,
        body_required: bool = True,
        success: int = 200,
        query: tuple[str, ...] = (),
    ) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method
        self.operation = Operation(
            summary=summary,
            permission=permission,
            body=body,
            body_required=body_required,
            success=success,
            query=query,
        )


class UndocumentedRoute(TypeError):
    """A route in the table that neither is an ``ApiRoute`` nor says it is not part of the API."""


def _api_routes(routes: Iterable[BaseRoute]) -> list[ApiRoute]:
    """The API routes among ``routes`` (mounted ones included). Raises ``UndocumentedRoute`` for a
    plain route that does not say ``include_in_schema=False``."""
    found: list[ApiRoute] = []
    for route in routes:
        if isinstance(route, ApiRoute):
            found.append(route)
        elif isinstance(route, Mount):
            found.extend(_api_routes(route.routes))
        elif isinstance(route, Route) and route.include_in_schema:
            methods = ", ".join(sorted(route.methods or ()))
            raise UndocumentedRoute(
                f"{methods} {route.path} has no API description: declare it as an ApiRoute (gateway.openapi),"
                " or pass include_in_schema=False if it is not part of the API"
            )
    return found


def openapi_document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API routes among ``routes`` (see :func:`_api_routes`)."""
    documented = _api_routes(routes)
    body_types = list(dict.fromkeys(route.operation.body for route in documented if route.operation.body))
    schemas, components = msgspec.json.schema_components(body_types, ref_template="#/components/schemas/{name}")
    body_schema = dict(zip(body_types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in documented:
        method = route.method.lower()
        if method in paths.get(route.path, {}):
            raise ValueError(f"{route.method} {route.path} is in the route table twice")
        paths.setdefault(route.path, {})[method] = _operation(route, body_schema)
    components["Problem"] = _PROBLEM
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "controlplane",
            "version": "1",
            "description": "Tasks, approvals and workers on an event log.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation(route: ApiRoute, body_schema: dict[type, Any]) -> dict[str, Any]:
    operation = route.operation
    if operation.permission is PUBLIC:
        return {"summary": operation.summary, "responses": {str(operation.success): {"description": "OK"}}}
    problem = {"content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    document: dict[str, Any] = {
        "summary": operation.summary,
        "description": f"Needs permission `{operation.permission}`.",
        "security": [{"bearer": []}],
        "parameters": [
            *(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in route.param_convertors
            ),
            *(
                {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                for name in operation.query
            ),
            *(
                [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}]
                if route.method in _IDEMPOTENT_METHODS
                else []
            ),
        ],
        "responses": {
            str(operation.success): {"description": "Success"},
            **{code: {"description": text, **problem} for code, text in _ERRORS.items()},
        },
    }
    if operation.body is not None:
        document["requestBody"] = {
            "required": operation.body_required,
            "content": {"application/json": {"schema": body_schema[operation.body]}},
        }
    return document


async def openapi(request: Request) -> Response:
    return json(request.app.state.openapi)


async def docs(request: Request) -> Response:
    rows = "".join(
        f"<tr><td><code>{method.upper()}</code></td><td><code>{path}</code></td><td>{op.get('summary', '')}</td>"
        f"<td>{op.get('description', '')}</td></tr>"
        for path, operations in request.app.state.openapi["paths"].items()
        for method, op in operations.items()
    )
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>controlplane API</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem}td,th{padding:.3rem .8rem;text-align:left}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body><h1>controlplane API v1</h1>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Errors are application/problem+json. "
        "Send <code>Authorization: Bearer &lt;API key or JWT&gt;</code>.</p>"
        f"<table><tr><th>method</th><th>path</th><th>what</th><th>who</th></tr>{rows}</table></body></html>"
    )
