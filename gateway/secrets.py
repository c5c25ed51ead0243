"""Secrets endpoints. An admin sets a secret (``PUT /v1/secrets/{name}``, org-wide or for one
environment; write-only) and lists names and versions (``GET /v1/secrets``); a worker reads one for the
task whose lease it holds (``POST /v1/tasks/{task_id}/secrets/{name}``), and each read is recorded on
the task as ``SecretRead`` (who, which secret and version, which task).

The value exists in clear only in the PUT's body, in this process's memory while it is sealed or
opened, and in the read's answer: the log holds ciphertext (``core/secret_box.py``), no answer but
the read's holds a value, and no problem detail or log line repeats one. Without ``CP_SECRETS_KEY``
every secrets endpoint answers 503 saying how to set it.

The listing reads the ``secrets`` read model (names, scopes, versions: PostgreSQL never holds a value,
sealed or not); a set (the next version to seal for) and a task's read (the version and ciphertext to
open) read the log, always fresh."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from application.bodies import SecretBody, SecretReadBody
from core.domain.commands import SECRET_NAME_PATTERN, ReadSecret, SetSecret
from core.domain.events import SecretRead, SecretVersionSet
from core.domain.ids import whole
from core.domain.secrets import SECRETS_AGGREGATE, SECRETS_ID, Secrets, SecretScope, VersionTaken
from core.domain.task import Task
from core.secret_box import HOW_TO_SET, Sealed, SecretBox, SecretUnreadable
from gateway.http import body, command_id, handled, json, path_id, principal, read_after, services
from gateway.problems import Problem
from gateway.services import Services
from gateway.worker_config import require_environment

SEAL_ATTEMPTS = 5
"""Sets of one secret racing each other: each lost race seals again for the next version."""
_NAME = re.compile(whole(SECRET_NAME_PATTERN))


def required_box(svc: Services) -> SecretBox:
    """The gateway's master key, or a 503 that says how to set one (secrets and channel credentials
    cannot reach the log without it)."""
    if svc.secret_box is None:
        raise Problem(503, f"secrets are off on this gateway: {HOW_TO_SET}")
    return svc.secret_box


def _secret_name(request: Request, status: int) -> str:
    name: str = request.path_params["name"]
    if not _NAME.match(name):
        shown = name[:64]
        if status == 404:
            raise Problem(404, f"secret {shown!r} not found")
        raise Problem(status, f"secret name {shown!r} must match {SECRET_NAME_PATTERN}")
    return name


def scope_document(scope: SecretScope) -> dict[str, Any]:
    return {
        "name": scope.name,
        "environment": scope.environment,
        "version": scope.version,
        "versions": list(scope.versions),
        "created_at": scope.created_at,
        "updated_at": scope.updated_at,
        "set_by": scope.set_by,
    }


async def put_secret(request: Request) -> Response:
    """A new version of the secret: 200 ``{name, version, environment, seq}``, never the value."""
    who = await principal(request, "admin")
    svc = services(request)
    box = required_box(svc)
    name = _secret_name(request, 422)
    spec = await body(request, SecretBody)
    await require_environment(svc, who.org, spec.environment)
    # Keyed by the master key: the command id in the log tells a retry from another value, and nothing else.
    fingerprint = box.fingerprint(name, spec.environment or "", spec.value)
    issued = command_id(request, who, "secret", name, fingerprint)
    for _ in range(SEAL_ATTEMPTS):
        secrets, _ = await svc.handler.load(who.org, SECRETS_AGGREGATE, SECRETS_ID)
        version = secrets.next_version(name)
        sealed = box.seal(who.org, name, version, spec.environment, spec.value)
        command = SetSecret(name=name, environment=spec.environment, version=version, **sealed._asdict())
        try:
            outcome = await svc.handler.handle(who.org, command, actor=who.actor, command_id=issued)
        except VersionTaken:
            continue
        recorded = outcome.events[0].event
        assert isinstance(recorded, SecretVersionSet)
        document = {"name": name, "version": recorded.version, "environment": recorded.environment}
        return json({**document, "seq": outcome.seq})
    raise Problem(409, f"secret {name} kept changing while this version was sealed; retry")


async def list_secrets(request: Request) -> Response:
    """Every secret's names, scopes and versions, from the ``secrets`` read model (which holds no value,
    sealed or not) once it holds the caller's own writes."""
    who = await principal(request, "admin")
    await read_after(request, "secrets", who)
    scopes, seq = await services(request).read_model.secret_scopes(who.org)
    return json({"items": [scope_document(scope) for scope in scopes], "seq": seq})


async def read_secret(request: Request) -> Response:
    """The value for the task whose lease the caller holds: the version the task is pinned to (its first
    read pins it), else the newest of the task's environment, else the newest org-wide. Only a worker
    credential may, and only the one that claimed the task (a lease-bound command)."""
    who = await principal(request, "lease")
    if "worker" not in who.actor.roles:
        raise Problem(
            403, f"this credential (roles {sorted(who.actor.roles)}) may not read secrets: only a worker key may"
        )
    svc = services(request)
    box = required_box(svc)
    task_id = path_id(request, "task_id", "task")
    name = _secret_name(request, 404)
    spec = await body(request, SecretReadBody)
    task, _ = await svc.handler.load(who.org, "task", task_id)
    if not isinstance(task, Task):
        raise Problem(404, f"task {task_id} not found")
    secrets, _ = await svc.handler.load(who.org, SECRETS_AGGREGATE, SECRETS_ID)
    newest = secrets.newest(name, task.environment)
    command = ReadSecret(
        task_id=task_id,
        worker_id=spec.worker_id,
        lease_id=spec.lease_id,
        name=name,
        newest_version=None if newest is None else newest.version,
    )
    outcome = await handled(request, who, command, "secret-read", task_id, name)
    read = outcome.events[0].event
    assert isinstance(read, SecretRead)
    value, environment = _opened(box, who.org, secrets, read)
    return json({"name": name, "version": read.version, "environment": environment, "value": value, "seq": outcome.seq})


def _opened(box: SecretBox, org: str, secrets: Secrets, read: SecretRead) -> tuple[str, str | None]:
    """The value of the version the read recorded (pinned, or the newest, which ``secrets`` holds)."""
    found = secrets.version(read.name, read.version)
    # A pin names a version read earlier, and the newest came from ``secrets`` itself: both are in it.
    assert found is not None
    sealed = Sealed(found.key_id, found.wrapped_key, found.nonce, found.ciphertext)
    try:
        return box.open(org, found.name, found.version, found.environment, sealed), found.environment
    except SecretUnreadable as exc:
        raise Problem(503, str(exc)) from None
