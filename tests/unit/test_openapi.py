"""The OpenAPI document the gateway serves: generated from the route table (a route cannot be added without
saying what the document says of it), valid OpenAPI 3.1 by an outside validator, and documenting at least
every operation it ever documented (the public contract: add freely, never remove)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.app import ROUTES
from gateway.openapi import ApiRoute, UndocumentedRoute, openapi_document

DOCUMENTED_BEFORE = {
    "POST /v1/tasks",
    "GET /v1/tasks",
    "GET /v1/tasks/{task_id}",
    "POST /v1/tasks/claim",
    "POST /v1/tasks/claim-batch",
    "POST /v1/tasks/{task_id}/heartbeat",
    "POST /v1/tasks/{task_id}/approval-requests",
    "POST /v1/tasks/{task_id}/complete",
    "POST /v1/tasks/{task_id}/fail",
    "POST /v1/tasks/{task_id}/cancel",
    "POST /v1/tasks/{task_id}/operations",
    "POST /v1/tasks/{task_id}/sleep",
    "POST /v1/tasks/{task_id}/non-determinism",
    "POST /v1/tasks/{task_id}/resume",
    "POST /v1/tasks/{task_id}/signals",
    "POST /v1/tasks/{task_id}/signal-waits",
    "GET /v1/tasks/{task_id}/events",
    "GET /v1/events",
    "GET /v1/approvals",
    "GET /v1/approvals/{approval_id}",
    "POST /v1/approvals/{approval_id}/approve",
    "POST /v1/approvals/{approval_id}/reject",
    "POST /v1/workers",
    "GET /v1/workers",
    "GET /v1/workers/{worker_id}",
    "DELETE /v1/workers/{worker_id}",
    "POST /v1/workers/{worker_id}/heartbeat",
    "POST /v1/workers/{worker_id}/reset",
    "POST /v1/api-keys",
    "DELETE /v1/api-keys/{key_id}",
    "POST /v1/policy-bundles",
    "GET /v1/policy-bundles",
    "GET /v1/policy-bundles/{version}",
    "POST /v1/environments",
    "GET /v1/environments",
    "GET /v1/environments/{name}",
    "PUT /v1/environments/{name}",
    "DELETE /v1/environments/{name}",
    "GET /v1/queues",
    "GET /v1/queues/{name}",
    "PUT /v1/queues/{name}",
    "DELETE /v1/queues/{name}",
    "POST /v1/notification-channels",
    "GET /v1/notification-channels",
    "GET /v1/notification-channels/{name}",
    "PUT /v1/notification-channels/{name}",
    "DELETE /v1/notification-channels/{name}",
    "POST /v1/notification-rules",
    "GET /v1/notification-rules",
    "DELETE /v1/notification-rules/{rule_id}",
    "POST /v1/schedules",
    "GET /v1/schedules",
    "GET /v1/schedules/{schedule_id}",
    "DELETE /v1/schedules/{schedule_id}",
    "POST /v1/schedules/{schedule_id}/pause",
    "POST /v1/schedules/{schedule_id}/resume",
    "POST /v1/schedules/{schedule_id}/trigger",
    "POST /v1/tasks/{task_id}/secrets/{name}",
    "PUT /v1/secrets/{name}",
    "GET /v1/secrets",
    "PUT /v1/worker-config",
    "GET /v1/worker-config",
    "GET /v1/stats",
    "GET /v1/usage",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /openapi.json",
    "GET /docs",
}
"""Every operation /openapi.json documented when the document came to be generated from the routes."""


def served() -> dict[str, Any]:
    return json.loads(msgspec.json.encode(openapi_document(ROUTES)))  # as /openapi.json sends it


def test_the_served_openapi_document_passes_an_outside_validator() -> None:
    document = served()
    assert document["openapi"].startswith("3.1")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def test_every_operation_documented_before_is_still_documented() -> None:
    documented = {f"{method.upper()} {path}" for path, item in served()["paths"].items() for method in item}
    assert DOCUMENTED_BEFORE - documented == set()


def test_a_route_added_without_a_description_fails_the_document() -> None:
    async def endpoint(request: Request) -> Response:
        return Response()

    with pytest.raises(UndocumentedRoute, match="POST /v1/things"):
        openapi_document([*ROUTES, Route("/v1/things", endpoint, methods=["POST"])])
    assert openapi_document([*ROUTES, Route("/page", endpoint, include_in_schema=False)]) == openapi_document(ROUTES)


def test_a_route_in_the_table_twice_fails_the_document() -> None:
    first = next(route for route in ROUTES if isinstance(route, ApiRoute))
    with pytest.raises(ValueError, match="twice"):
        openapi_document([*ROUTES, first])


def test_each_operation_names_the_path_parameters_of_its_path() -> None:
    for path, item in served()["paths"].items():
        for operation in item.values():
            named = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
            assert [f"{{{name}}}" for name in named] == [part for part in path.split("/") if part.startswith("{")]


def test_every_default_in_a_body_schema_is_a_value_the_schema_accepts() -> None:
    """A default the schema itself refuses (say ``""`` under ``minLength: 1``) would tell a client that
    leaving the field out sends a value that is not allowed."""
    document = served()
    refused = [
        f"{where}: default {default!r}: {error.message}"
        for where, schema, default in _defaults(document["components"]["schemas"])
        for error in Draft202012Validator({**schema, "components": document["components"]}).iter_errors(default)
    ]
    assert refused == []


def _defaults(schemas: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Any]]:
    for name, schema in schemas.items():
        for field, field_schema in schema.get("properties", {}).items():
            if "default" in field_schema:
                without_default = {key: value for key, value in field_schema.items() if key != "default"}
                yield f"{name}.{field}", without_default, field_schema["default"]
