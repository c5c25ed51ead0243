"""Environments: an org's admin names the queues each environment holds (a queue belongs to at most
one). A task's environment is then its queue's, decided here at submit and recorded with the task;
policies see that, never what a submitter declares.

``POST`` creates (409 if the name exists), ``PUT /v1/environments/{name}`` creates or replaces the
queues and labels whole, ``DELETE`` removes. Reads come from the log (the org's environments are one
small aggregate, which submits read anyway), so every read shows every write before it, on any
gateway; the ``environments`` read model holds the same for SQL readers and rebuilds."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from application.bodies import EnvironmentBody, EnvironmentReplaceBody
from core.domain.commands import DefineEnvironment, DeleteEnvironment
from core.domain.environments import Environment
from core.domain.errors import AlreadyExists
from core.domain.ids import InvalidToken, validate_token
from gateway.http import body, handled, json, path_id, principal, services
from gateway.problems import Problem


def environment_document(environment: Environment, seq: int) -> dict[str, Any]:
    """``seq`` is the sequence of the org's environments' last event when read (of this write, in a
    write's answer)."""
    return {
        "name": environment.name,
        "queues": list(environment.queues),
        "labels": environment.labels,
        "created_at": environment.created_at,
        "updated_at": environment.updated_at,
        "defined_by": environment.defined_by,
        "seq": seq,
    }


async def create(request: Request) -> Response:
    who = await principal(request, "admin")
    spec = await body(request, EnvironmentBody)
    command = DefineEnvironment(name=spec.name, queues=spec.queues, labels=spec.labels)
    fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
    try:
        outcome = await handled(request, who, command, "environment", fingerprint)
    except AlreadyExists as exc:
        raise Problem(
            409,
            f"environment {spec.name} already exists; replace its queues and labels with "
            f"PUT /v1/environments/{spec.name}, or delete it first",
        ) from exc
    return json(environment_document(outcome.state.get(spec.name), outcome.seq), 201)


async def replace(request: Request) -> Response:
    who = await principal(request, "admin")
    name = request.path_params["name"]
    try:
        validate_token(name, "environment name")
    except InvalidToken as exc:
        raise Problem(422, str(exc)) from exc
    spec = await body(request, EnvironmentReplaceBody)
    command = DefineEnvironment(name=name, queues=spec.queues, labels=spec.labels, replace=True)
    fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
    outcome = await handled(request, who, command, "environment", name, fingerprint)
    return json(environment_document(outcome.state.get(name), outcome.seq))


async def list_environments(request: Request) -> Response:
    who = await principal(request, "read")
    environments, seq = await services(request).environments.current(who.org)
    return json({"items": [environment_document(env, seq) for env in environments.listed()], "seq": seq})


async def get_environment(request: Request) -> Response:
    who = await principal(request, "read")
    name = path_id(request, "name", "environment")
    environments, seq = await services(request).environments.current(who.org)
    environment = environments.get(name)
    if environment is None:
        raise Problem(404, f"environment {name} not found")
    return json(environment_document(environment, seq))


async def delete(request: Request) -> Response:
    who = await principal(request, "admin")
    name = path_id(request, "name", "environment")
    await handled(request, who, DeleteEnvironment(name=name), "environment-delete", name)
    return Response(status_code=204)
