"""Worker configuration endpoints: an admin sets the org's (``PUT /v1/worker-config``) or one
environment's (``?environment=``), replaced whole, and reads it back; a worker gets what applies to it
in the answer to its registration (``config``): the org's, overridden field by field by its queue's
environment's, with the policy bundle version new submissions are decided by. A registration reads
the log (one small aggregate per org), so one right after a change gets the change, on any gateway;
``GET`` reads the ``worker_config`` read model once it holds the caller's own writes (``?min_seq=``
for anyone else's)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from application.bodies import WorkerConfigBody
from core.domain.commands import SetWorkerConfig
from core.domain.worker_config import WORKER_CONFIG_AGGREGATE, WORKER_CONFIG_ID, WorkerConfigs
from gateway.http import body, handled, json, principal, query, read_after, services
from gateway.problems import Problem
from gateway.queries import EnvironmentScope
from gateway.services import Services


async def require_environment(svc: Services, org: str, environment: str | None) -> None:
    """A setting scoped to an environment the org has not defined would apply to nothing: 422."""
    if environment is None:
        return
    environments, _ = await svc.environments.current(org)
    if environments.get(environment) is None:
        raise Problem(
            422,
            f"environment {environment} is not defined in this org; GET /v1/environments lists them, "
            f"or define it first (PUT /v1/environments/{environment})",
        )


def config_document(configs: WorkerConfigs, environment: str | None, seq: int) -> dict[str, Any]:
    """The scope's own settings, and ``effective``: what a worker of that scope gets."""
    own: dict[str, Any] = msgspec.to_builtins(configs.scope(environment))
    effective = msgspec.to_builtins(configs.effective(environment))
    return {"environment": environment, **own, "effective": effective, "seq": seq}


async def put_config(request: Request) -> Response:
    who = await principal(request, "admin")
    environment = query(request, EnvironmentScope).environment
    spec = await body(request, WorkerConfigBody)
    svc = services(request)
    await require_environment(svc, who.org, environment)
    command = SetWorkerConfig(environment=environment, **msgspec.structs.asdict(spec))
    fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
    outcome = await handled(request, who, command, "worker-config", environment or "", fingerprint)
    return json(config_document(outcome.state, environment, outcome.seq))


async def get_config(request: Request) -> Response:
    who = await principal(request, "admin")
    environment = query(request, EnvironmentScope).environment
    await read_after(request, "worker_config", who)
    configs, seq = await services(request).read_model.worker_configs(who.org)
    return json(config_document(configs, environment, seq))


async def worker_config(svc: Services, org: str, queue: str) -> dict[str, Any]:
    """What a worker on ``queue`` is told at registration: the configuration of its queue's environment
    over the org's, and the policy bundle version that decides new submissions (null: the shipped one).
    Read from the log, not the read model: a worker registering right after a change gets the change."""
    environments, _ = await svc.environments.current(org)
    holder = environments.of_queue(queue)
    environment = None if holder is None else holder.name
    configs, _ = await svc.handler.load(org, WORKER_CONFIG_AGGREGATE, WORKER_CONFIG_ID)
    version, bundle = await svc.submit_gate.bundle_for(org)
    return {
        "environment": environment,
        **msgspec.to_builtins(configs.effective(environment)),
        "policy_bundle_version": version,
        "policy_bundle_digest": bundle.digest,
    }
