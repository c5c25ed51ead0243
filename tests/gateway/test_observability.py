"""Traces, structured logs and request ids, over real processes.

- One trace: an OTLP/HTTP receiver in this process (a Starlette app decoding the protobuf
  ``ExportTraceServiceRequest``) gets the spans of the gateway and projector served here and of a
  ``controlplane runner`` subprocess; a workflow with a step, an LLM call and a human approval gives one
  connected trace from the submit to the completion.
- JSON logs: a ``controlplane gateway`` and a ``controlplane runner`` subprocess with
  ``CP_LOG_FORMAT=json`` write only JSON lines, and a request's lines carry its ``X-Request-Id``.
- Request ids: given, generated or taken from ``traceparent``; hostile ones replaced, never a 5xx; and
  stored as the correlation id of the events the request appends."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from controlplane.embedded import EmbeddedNats, free_port
from core import telemetry
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject
from projections.roles import GATEWAY_ROLE
from tests.gateway.conftest import Stack, own_stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
CONTROLPLANE = str(Path(sys.executable).parent / "controlplane")
TOKEN_LIKE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


# --- an OTLP/HTTP receiver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]
    """(trace id, span id) of each link."""


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


@dataclass
class Receiver:
    url: str
    spans: list[ReceivedSpan] = field(default_factory=list)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def named(self, name: str, **attributes: Any) -> list[ReceivedSpan]:
        return [
            span
            for span in self.spans
            if span.name == name and all(span.attributes.get(key) == value for key, value in attributes.items())
        ]


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    receiver = Receiver(f"http://127.0.0.1:{port}")

    async def traces(request: Request) -> Response:
        raw = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        exported = ExportTraceServiceRequest.FromString(raw)
        for resource_spans in exported.resource_spans:
            resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    receiver.spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={item.key: _value(item.value) for item in span.attributes},
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        )
                    )
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    app = Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield receiver
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


@contextlib.asynccontextmanager
async def traced_here(receiver: Receiver) -> AsyncIterator[TracerProvider]:
    """This process (gateway and projector) exports to ``receiver``, as ``controlplane gateway`` would."""
    provider = TracerProvider(resource=Resource.create({"service.name": "controlplane-gateway"}))
    # The exporter posts from its own thread to a server on this event loop: flushing must not block the loop.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces")))
    telemetry.enable(provider.get_tracer("controlplane"))
    try:
        yield provider
    finally:
        telemetry.disable()
        await asyncio.to_thread(provider.shutdown)


# --- processes -------------------------------------------------------------------------------------------


def start_runner(url: str, key: str, queue: str, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    command = [CONTROLPLANE, "runner", "--url", url, "--queue", queue, "--worker-id", f"obs-{new_id()[-6:]}"]
    command += ["--workflows", "tests.gateway.traced_workflows:ALL", "--lease-seconds", "10"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "CP_WORKER_KEY": key, "CP_LOG_FORMAT": "json", **env}
    log = log_path.open("wb")
    return subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO, env=environment)


def start_gateway(nats_url: str, port: int, log_path: Path, environment: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        command = [CONTROLPLANE, "gateway", "--nats-url", nats_url, "--port", str(port)]
        return subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO, env=environment)


async def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()  # drains, flushes its spans; its last calls go to a gateway on this event loop
    assert await asyncio.to_thread(process.wait, 20) == 0


async def until(check: Callable[[], Any], within: float = 30) -> Any:
    async with asyncio.timeout(within):
        while not (found := await check()):
            await asyncio.sleep(0.1)
    return found


async def run_to_completion(client: httpx.AsyncClient, approver: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    """Wait for the workflow's approval, approve it, and wait for the task to complete."""

    async def waiting() -> bool:
        task = (await client.get(f"/v1/tasks/{task_id}")).json()
        return task["status"] == "awaiting_approval"

    await until(waiting)
    approved = await approver.post(f"/v1/approvals/{task_id}-1/approve", json={"comment": "go"})
    assert approved.status_code == 200, approved.text

    async def completed() -> dict[str, Any] | None:
        task = (await client.get(f"/v1/tasks/{task_id}")).json()
        return task if task["status"] == "completed" else None

    return await until(completed)  # type: ignore[no-any-return]


async def events_of(stack: Stack, task_id: str) -> list[RecordedEvent]:
    return await stack.services.store.read_subject(aggregate_subject("acme", "task", task_id))


# --- (a) one trace across three processes -------------------------------------------------------------


async def test_one_trace_covers_submit_claim_steps_approval_and_completion_across_processes(
    tmp_path: Path, database_url: str
) -> None:
    queue = f"obs{new_id()[-8:]}"
    async with (
        otlp_receiver() as receiver,
        traced_here(receiver) as provider,
        own_stack(tmp_path / "stack", database_url) as stack,
    ):
        runner = start_runner(
            stack.url,
            stack.keys["acme"]["worker"],
            queue,
            tmp_path / "runner.log",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="200",
        )
        try:
            async with stack.client(role="submitter") as submitter, stack.client(role="approver") as approver:
                body = {"type": "deploy", "queue": queue, "workflow": {"name": "traced-deploy", "version": 1}}
                submitted = await submitter.post("/v1/tasks", json={**body, "payload": {"env": "prod"}})
                assert submitted.status_code == 201, submitted.text
                task_id = submitted.json()["id"]
                done = await run_to_completion(submitter, approver, task_id)
                assert done["result"]["deployed"] is True
                await stack.projector.run_until_caught_up()
        finally:
            await stop(runner)
        await asyncio.to_thread(provider.force_flush)
        recorded = await events_of(stack, task_id)

    [submit] = receiver.named("command SubmitTask", **{"cp.aggregate_id": task_id})
    trace = receiver.trace(submit.trace_id)
    names = {(span.service, span.name) for span in trace}
    # The gateway: the submit request and its command, the claims (from the claim requests' own traces),
    # the runner's calls, the human's approval and the completion.
    for expected in (
        ("controlplane-gateway", "POST /v1/tasks"),
        ("controlplane-gateway", "command ClaimTask"),
        ("controlplane-gateway", "command RecordOperation"),
        ("controlplane-gateway", "command RequestApproval"),
        ("controlplane-gateway", "command DecideApproval"),
        ("controlplane-gateway", "command CompleteTask"),
        ("controlplane-gateway", "POST /v1/tasks/{task_id}/complete"),
        # The runner, in its own process: the workflow (claimed twice: before and after the human), each
        # operation that ran, the approval's request and how long the humans took.
        ("controlplane-runner", "workflow traced-deploy"),
        ("controlplane-runner", "step plan"),
        ("controlplane-runner", "policy controlplane/tool"),
        ("controlplane-runner", "llm summarise"),
        ("controlplane-runner", "approval request"),
        ("controlplane-runner", "approval wait"),
        ("controlplane-runner", "step ship"),
    ):
        assert expected in names, f"{expected} not in the trace: {sorted(names)}"
    assert len([span for span in trace if span.name == "workflow traced-deploy"]) == 2
    # Connected: every span but the submit request's root has its parent in the same trace.
    ids = {span.span_id for span in trace}
    roots = [span for span in trace if span.parent_span_id not in ids]
    assert [(root.name, root.parent_span_id) for root in roots] == [("POST /v1/tasks", "")]
    # A claim joins the task's trace and links the claim request it came with.
    claims = [span for span in trace if span.name == "command ClaimTask"]
    assert claims and all(len(span.links) == 1 and span.links[0][0] != submit.trace_id for span in claims)
    [llm] = [span for span in trace if span.name == "llm summarise"]
    assert llm.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert llm.attributes["gen_ai.usage.input_tokens"] > 0
    assert llm.attributes["gen_ai.usage.output_tokens"] > 0
    [wait] = [span for span in trace if span.name == "approval wait"]
    assert wait.attributes["cp.approval.status"] == "approved"
    # The projector folded the task's events in batches that join (or link) its trace.
    projected = [
        span
        for span in receiver.spans
        if span.name == "project"
        and (span.trace_id == submit.trace_id or any(link[0] == submit.trace_id for link in span.links))
    ]
    assert projected and all("tasks" in span.attributes["cp.projections"].split(",") for span in projected)
    # Every event of the task carries the trace in its headers.
    assert all(item.traceparent and telemetry.trace_id_of(item.traceparent) == submit.trace_id for item in recorded)


# --- (b) JSON logs from a gateway and a runner process ------------------------------------------------


async def test_every_log_line_is_json_and_a_requests_lines_carry_its_request_id(
    stack: Stack, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    queue = f"obs{new_id()[-8:]}"
    port = free_port()
    gateway_log, runner_log = tmp_path / "gateway.log", tmp_path / "runner.log"
    environment = {
        **os.environ,
        "DATABASE_URL": stack.database_logins[GATEWAY_ROLE],
        "CP_LOG_FORMAT": "json",
    }
    environment.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    gateway = start_gateway(nats_server.url, port, gateway_log, environment)
    url = f"http://127.0.0.1:{port}"
    runner = None
    try:
        async with httpx.AsyncClient(base_url=url) as probe:

            async def up() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await probe.get("/healthz")).status_code == 200
                return False

            await until(up)
        runner = start_runner(url, stack.keys["acme"]["worker"], queue, runner_log)
        request_id = f"submit-{new_id()}"
        keys = stack.keys["acme"]
        async with (
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {keys['submitter']}"}) as submitter,
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {keys['approver']}"}) as approver,
        ):
            body = {
                "type": "deploy",
                "queue": queue,
                "workflow": {"name": "traced-deploy", "version": 1},
                "payload": {},
            }
            submitted = await submitter.post("/v1/tasks", json=body, headers={"X-Request-Id": request_id})
            assert submitted.status_code == 201, submitted.text
            assert submitted.headers["X-Request-Id"] == request_id
            task_id = submitted.json()["id"]
            await run_to_completion(submitter, approver, task_id)
            missing = await submitter.get("/v1/tasks/nope", headers={"X-Request-Id": "not-found-1"})
            assert missing.status_code == 404
    finally:
        if runner is not None:
            await stop(runner)
        await stop(gateway)

    def lines(path: Path) -> list[dict[str, Any]]:
        text = path.read_text()
        assert text.strip(), f"{path.name} is empty"
        return [json.loads(line) for line in text.splitlines()]  # raises on any line that is not JSON

    gateway_lines, runner_lines = lines(gateway_log), lines(runner_log)
    for line in gateway_lines + runner_lines:
        assert {"time", "level", "process", "logger", "message"} <= line.keys(), line
    assert {line["process"] for line in gateway_lines} == {"gateway"}
    assert {line["process"] for line in runner_lines} == {"runner"}
    # The submit's access line, in the gateway, carries its id and org; so does the 404's.
    with_id = [line for line in gateway_lines if line.get("correlation_id") == request_id]
    [submit_line] = [line for line in with_id if line.get("http_route") == "/v1/tasks"]
    assert (submit_line["http_method"], submit_line["http_status"], submit_line["org"]) == ("POST", 201, "acme")
    [missing_line] = [line for line in gateway_lines if line.get("correlation_id") == "not-found-1"]
    assert (missing_line["http_status"], missing_line["task_id"]) == (404, "nope")
    # The runner's lines about the task carry the submit's request id, the org and the task id ...
    about_task = [line for line in runner_lines if line.get("task_id") == task_id]
    assert len(about_task) >= 4  # two claims: each says it runs, then that it suspended or completed
    assert all(line["correlation_id"] == request_id and line["org"] == "acme" for line in about_task)
    # ... which it sent with its calls for the task: the gateway's lines of those carry it too.
    routes = {line.get("http_route") for line in with_id if line.get("task_id") == task_id}
    assert {"/v1/tasks/{task_id}/operations", "/v1/tasks/{task_id}/complete"} <= routes


# --- (c) request ids -----------------------------------------------------------------------------------

SUBMIT = {"type": "obs", "queue": "obs-ids", "payload": {}}


async def test_a_given_request_id_is_returned_and_stored_as_the_events_correlation_id(stack: Stack) -> None:
    given = f"order-{new_id()}:attempt.1"
    async with stack.client(role="submitter") as client:
        submitted = await client.post("/v1/tasks", json=SUBMIT, headers={"X-Request-Id": given})
        assert submitted.status_code == 201
        assert submitted.headers["X-Request-Id"] == given
        task_id = submitted.json()["id"]
        cancelled = await client.post(f"/v1/tasks/{task_id}/cancel", headers={"X-Request-Id": "cancel-1"})
        assert cancelled.status_code == 200
    [submit, cancel] = await events_of(stack, task_id)
    assert (type(submit.event).__name__, submit.correlation_id) == ("TaskSubmitted", given)
    assert (type(cancel.event).__name__, cancel.correlation_id) == ("TaskCancelled", "cancel-1")


async def test_without_a_request_id_one_is_made_or_taken_from_traceparent(stack: Stack) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with stack.client(role="submitter") as client:
        made = [(await client.post("/v1/tasks", json=SUBMIT)) for _ in range(2)]
        ids = [response.headers["X-Request-Id"] for response in made]
        assert all(TOKEN_LIKE.fullmatch(value) for value in ids) and ids[0] != ids[1]
        [first] = await events_of(stack, made[0].json()["id"])
        assert first.correlation_id == ids[0]

        traced = await client.post(
            "/v1/tasks", json=SUBMIT, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        )
        assert traced.headers["X-Request-Id"] == trace_id
        [event] = await events_of(stack, traced.json()["id"])
        assert event.correlation_id == trace_id
        # A given id wins over traceparent.
        both = await client.get(
            "/healthz", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-Id": "mine"}
        )
        assert both.headers["X-Request-Id"] == "mine"


@pytest.mark.parametrize(
    "hostile",
    [
        b"",
        b"a  b",
        b"a b",
        b"x" * 129,
        b"../../etc/passwd",
        b"<script>alert(1)</script>",
        b"id;DROP TABLE tasks",
        "\u00e9t\u00e9".encode(),
        b"\xff\xfe",
        b"-leading-dash",
        b"a\tb",
        b"%0d%0aSet-Cookie:x",
    ],
)
async def test_a_hostile_request_id_is_replaced_never_a_5xx(stack: Stack, hostile: bytes) -> None:
    bad_traceparents = [b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", b"ff-" + b"a" * 200, hostile]
    async with stack.client(role="submitter") as client:
        for traceparent in bad_traceparents:
            headers = {b"X-Request-Id": hostile, b"traceparent": traceparent}
            for response in (
                await client.post("/v1/tasks", json=SUBMIT, headers=headers),
                await client.get("/v1/tasks/nope", headers=headers),  # problem+json
                await client.get("/v1/tasks", headers={**headers, b"Authorization": b"Bearer nope"}),  # 401
            ):
                assert response.status_code < 500, response.text
                returned = response.headers["X-Request-Id"]
                assert TOKEN_LIKE.fullmatch(returned) and returned.encode() != hostile
            [event] = await events_of(
                stack, (await client.post("/v1/tasks", json=SUBMIT, headers=headers)).json()["id"]
            )
            assert event.correlation_id is not None and TOKEN_LIKE.fullmatch(event.correlation_id)


async def test_an_unexpected_error_answers_503_with_the_request_id(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 503 that ObserveRequests makes of an unexpected error still carries the request id."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(stack.services.handler, "load", broken)
    async with stack.client() as client:
        response = await client.get("/v1/tasks/sometask", headers={"X-Request-Id": "broken-1"})
    assert (response.status_code, response.headers["X-Request-Id"]) == (503, "broken-1")
