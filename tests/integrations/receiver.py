"""A local webhook receiver (Starlette on uvicorn, 127.0.0.1, a free port) that records what it gets,
checks each delivery with the shipped verifier and answers as a test tells it; and the `controlplane
webhook` process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from controlplane.embedded import free_port
from integrations.webhook import WebhookRefused, verify_delivery

SECRET = b"shared-webhook-secret"


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    refused: str | None
    """Why ``verify_delivery`` refused it; None when it is a fresh delivery signed with SECRET."""

    @property
    def signed(self) -> bool:
        return self.refused is None

    @property
    def task(self) -> tuple[str, str]:
        """(org, task id) of the task event (or the notification about a task) it carried; ("", "") for
        anything else."""
        try:
            body = json.loads(self.body)
            if "notification_id" in body:
                return body["org"], body["task"]["id"]
            return body["org"], body["event"]["task_id"]
        except (ValueError, KeyError, TypeError):
            return "", ""


@dataclass
class Receiver:
    """Records every POST, verifies it, and answers what ``answer`` says for the task id
    and the attempt number for that task; 200 by default. A negative answer means: wait that many
    seconds, then answer 200."""

    url: str
    received: list[Received] = field(default_factory=list)
    answer: Callable[[str, int], float] = lambda task_id, attempt: 200

    def attempts(self, org: str, task_id: str) -> list[Received]:
        return [request for request in self.received if request.task == (org, task_id)]


@asynccontextmanager
async def serving_receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}/hook")

    async def hook(request: Request) -> Response:
        body = await request.body()
        try:
            verify_delivery(body, request.headers, SECRET)
            refused = None
        except WebhookRefused as exc:
            refused = str(exc)
        received = Received(body, dict(request.headers), refused)
        state.received.append(received)
        org, task_id = received.task
        answer = state.answer(task_id, len(state.attempts(org, task_id)))
        if answer < 0:
            await asyncio.sleep(-answer)
            answer = 200
        return Response(f"answer {answer}", status_code=int(answer))

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield state
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


@asynccontextmanager
async def webhook_command(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    """`controlplane webhook ARGS` with the secret in TEST_HOOK_SECRET; yields once it is forwarding
    and kills it if the test did not stop it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane",
        "webhook",
        *args,
        "--secret-env",
        "TEST_HOOK_SECRET",
        # NO_PROXY: a proxy from the environment must not intercept the local receiver.
        env={**os.environ, "TEST_HOOK_SECRET": SECRET.decode(), "NO_PROXY": "127.0.0.1", **(env or {})},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            while b"forwarding events" not in (line := await process.stderr.readline()):
                if not line:
                    raise AssertionError(f"controlplane webhook exited with {await process.wait()}")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
