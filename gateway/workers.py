"""Worker endpoints: registration, heartbeats, listing, deregistration."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from application.bodies import WorkerHeartbeatBody
from application.incarnations import release_if_restarted
from core.domain.commands import DeregisterWorker, HeartbeatWorker, RegisterWorker
from core.domain.worker import Worker
from gateway.http import body, handled, json, path_id, principal, query, read_after, services
from gateway.problems import Problem
from gateway.queries import WorkerList
from gateway.views import worker_document
from gateway.worker_config import worker_config


async def register(request: Request) -> Response:
    who = await principal(request, "workers")
    command = await body(request, RegisterWorker)  # the command is the body: one schema
    svc = services(request)
    outcome = await handled(request, who, command, "register", command.worker_id)
    released = await release_if_restarted(svc.handler, svc.store, svc.read_model, who.org, who.actor, outcome)
    document = worker_document(
        outcome.state, await _completed(request, who.org, command.worker_id), max(outcome.seq, released.seq)
    )
    config = await worker_config(svc, who.org, command.queue)  # what the worker is to apply (gateway/worker_config.py)
    return json({**document, "released_tasks": list(released.task_ids), "config": config}, 201)


async def heartbeat(request: Request) -> Response:
    who = await principal(request, "workers")
    spec = await body(request, WorkerHeartbeatBody, optional=True)
    worker_id = path_id(request, "worker_id", "worker")
    outcome = await handled(
        request, who, HeartbeatWorker(worker_id=worker_id, status=spec.status), "heartbeat", worker_id
    )
    return json(worker_document(outcome.state, await _completed(request, who.org, worker_id), outcome.seq))


async def deregister(request: Request) -> Response:
    who = await principal(request, "workers")
    worker_id = path_id(request, "worker_id", "worker")
    await handled(request, who, DeregisterWorker(worker_id=worker_id), "deregister", worker_id)
    return Response(status_code=204)


async def list_workers(request: Request) -> Response:
    who = await principal(request, "read")
    asked = query(request, WorkerList)
    await read_after(request, "workers", who)
    rows = await services(request).read_model.list_workers(
        who.org,
        queue=asked.queue,
        capability=asked.capability,
        available=None if asked.available is None else asked.available == "true",
    )
    return json({"items": [worker_document(worker, completed, seq) for worker, completed, seq in rows]})


async def get_worker(request: Request) -> Response:
    who = await principal(request, "read")
    worker_id = path_id(request, "worker_id", "worker")
    worker, seq = await services(request).handler.load(who.org, "worker", worker_id)
    if not isinstance(worker, Worker):
        raise Problem(404, f"worker {worker_id} not found")
    return json(worker_document(worker, await _completed(request, who.org, worker_id), seq))


async def _completed(request: Request, org: str, worker_id: str) -> int:
    row = await services(request).read_model.get_worker(org, worker_id)
    return 0 if row is None else row[1]
