"""The webhook forwarder against a local HTTP receiver (Starlette on uvicorn, 127.0.0.1, free port) and
the real nats-server: signatures, retries with backoff, dead letters, and the CLI process. The signing
scheme itself (Standard Webhooks, freshness, tampering) is tested in tests/security."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from nats.aio.client import Client as NATS

from controlplane.cli import main
from controlplane.embedded import EmbeddedNats, free_port
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME
from integrations.consumer import H_DLQ_DELIVERIES, H_DLQ_ERROR, EventSubscription, dead_letter_subject
from integrations.webhook import WebhookForwarder, display_url
from tests.integrations.helpers import dead_lettered, dead_letters, submit, wait_for
from tests.integrations.receiver import SECRET, Receiver, webhook_command

pytestmark = pytest.mark.integration


@pytest.fixture
async def forwarding(nc: NATS, org: str, receiver: Receiver) -> AsyncIterator[Callable[..., WebhookForwarder]]:
    """Starts forwarders for this test's org; stops them at its end."""
    started: list[tuple[WebhookForwarder, asyncio.Task[None], httpx.AsyncClient]] = []

    def start(url: str | None = None, timeout: float = 5.0, **options: object) -> WebhookForwarder:
        subscription = EventSubscription(
            nc,
            org,
            "hook",
            retry_delay=0.05,
            max_retry_delay=0.2,
            **options,  # type: ignore[arg-type]
        )
        client = httpx.AsyncClient(timeout=timeout, trust_env=False)
        forwarder = WebhookForwarder(subscription, url or receiver.url, SECRET, client=client)
        started.append((forwarder, asyncio.create_task(forwarder.run()), client))
        return forwarder

    yield start
    for forwarder, task, client in started:
        forwarder.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
    receiver.answer = lambda task_id, attempt: 200


async def test_events_arrive_signed_and_server_errors_are_retried_with_the_same_delivery_id(
    nc: NATS, handler: CommandHandler, org: str, receiver: Receiver, forwarding: Callable[..., WebhookForwarder]
) -> None:
    receiver.answer = lambda task_id, attempt: 503 if task_id == "flaky" and attempt <= 2 else 200
    forwarder = forwarding(max_deliveries=5)
    seq = await submit(handler, org, "flaky")
    await wait_for(lambda: len(receiver.attempts(org, "flaky")) == 3)

    attempts = receiver.attempts(org, "flaky")
    assert all(request.signed for request in attempts)
    assert [request.headers["x-cp-delivery-attempt"] for request in attempts] == ["1", "2", "3"]
    assert {request.headers["x-cp-delivery-id"] for request in attempts} == {f"hook@{org}:{seq}"}
    assert {request.headers["webhook-id"] for request in attempts} == {f"hook@{org}:{seq}"}
    assert {request.headers["x-cp-event-type"] for request in attempts} == {"TaskSubmitted"}
    assert {request.headers["x-cp-seq"] for request in attempts} == {str(seq)}
    body = json.loads(attempts[-1].body)
    assert (body["org"], body["seq"], body["type"], body["subject"]) == (
        org,
        seq,
        "TaskSubmitted",
        f"cp.{org}.task.flaky",
    )
    assert body["event"]["task_id"] == "flaky"
    await wait_for(lambda: _all_acknowledged(nc, forwarder))


async def test_a_refusing_receiver_dead_letters_at_once_and_later_events_still_arrive(
    nc: NATS, handler: CommandHandler, org: str, receiver: Receiver, forwarding: Callable[..., WebhookForwarder]
) -> None:
    receiver.answer = lambda task_id, attempt: 422 if task_id == "rejected" else 200
    forwarding(max_deliveries=5)
    await submit(handler, org, "rejected")
    await submit(handler, org, "accepted")
    js = nc.jetstream()
    await wait_for(lambda: dead_lettered(js, dead_letter_subject(org, "hook")))
    await wait_for(lambda: len(receiver.attempts(org, "accepted")) == 1)
    [letter] = await dead_letters(js, dead_letter_subject(org, "hook"))
    assert len(receiver.attempts(org, "rejected")) == 1
    assert (letter.headers or {})[H_DLQ_DELIVERIES] == "1"
    assert (letter.headers or {})[H_DLQ_ERROR] == f"{receiver.url} refused the event with 422: answer 422"


@pytest.mark.parametrize("status", [500, 429, 408])
async def test_a_receiver_that_keeps_failing_gets_max_deliveries_then_the_event_is_dead_lettered(
    nc: NATS,
    handler: CommandHandler,
    org: str,
    receiver: Receiver,
    forwarding: Callable[..., WebhookForwarder],
    status: int,
) -> None:
    receiver.answer = lambda task_id, attempt: status
    forwarding(max_deliveries=3)
    await submit(handler, org, "down")
    js = nc.jetstream()
    await wait_for(lambda: dead_lettered(js, dead_letter_subject(org, "hook")))
    [letter] = await dead_letters(js, dead_letter_subject(org, "hook"))
    assert len(receiver.attempts(org, "down")) == 3
    assert (letter.headers or {})[H_DLQ_DELIVERIES] == "3"
    assert (letter.headers or {})[H_DLQ_ERROR] == f"ReceiverUnavailable: {receiver.url} answered {status}"


async def test_a_timeout_is_retried(
    nc: NATS, handler: CommandHandler, org: str, receiver: Receiver, forwarding: Callable[..., WebhookForwarder]
) -> None:
    receiver.answer = lambda task_id, attempt: -1.0 if attempt == 1 else 200
    forwarder = forwarding(timeout=0.3)
    await submit(handler, org, "slow")
    await wait_for(lambda: len(receiver.attempts(org, "slow")) == 2)
    await wait_for(lambda: _all_acknowledged(nc, forwarder))


async def test_an_unreachable_receiver_is_retried_then_dead_lettered_naming_it_without_credentials(
    nc: NATS, handler: CommandHandler, org: str, forwarding: Callable[..., WebhookForwarder]
) -> None:
    port = free_port()
    closed = f"http://hook-user:hook-password@127.0.0.1:{port}/hook?token=query-token"
    forwarding(url=closed, max_deliveries=2)
    await submit(handler, org, "nobody-home")
    js = nc.jetstream()
    await wait_for(lambda: dead_lettered(js, dead_letter_subject(org, "hook")))
    [letter] = await dead_letters(js, dead_letter_subject(org, "hook"))
    assert (letter.headers or {})[H_DLQ_DELIVERIES] == "2"
    error = (letter.headers or {})[H_DLQ_ERROR]
    assert error.startswith(f"ReceiverUnavailable: cannot reach http://127.0.0.1:{port}/hook?…")
    assert "hook-password" not in error and "query-token" not in error
    assert display_url(closed) == f"http://127.0.0.1:{port}/hook?…"


async def test_the_webhook_command_forwards_until_sigterm(
    nats_server: EmbeddedNats, handler: CommandHandler, org: str, receiver: Receiver
) -> None:
    async with webhook_command(
        org, "--url", receiver.url, "--types", "TaskSubmitted", "--name", "cli", "--nats-url", nats_server.url
    ) as process:
        await submit(handler, org, "via-cli")
        await wait_for(lambda: len(receiver.attempts(org, "via-cli")) == 1)
        assert receiver.attempts(org, "via-cli")[0].signed
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--url", "http://127.0.0.1:1/x", "--secret-env", "UNSET_SECRET_VAR"],
            {},
            "UNSET_SECRET_VAR is unset or empty",
        ),
        (["--url", "ftp://example.com/x", "--secret-env", "S"], {"S": "x"}, "invalid webhook URL"),
        (["--url", "http://127.0.0.1:1/x", "--secret-env", "S"], {"S": "whsec_not base64!"}, "invalid webhook secret"),
        (["--url", "http://127.0.0.1:1/x", "--secret-env", "S", "--types", "TaskSubmitted,Nope"], {"S": "x"}, "Nope"),
        (
            ["--url", "http://127.0.0.1:1/x", "--secret-env", "S", "--name", "a.b"],
            {"S": "x"},
            "invalid integration name",
        ),
    ],
)
def test_the_webhook_command_refuses_bad_input_before_connecting(
    argv: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("UNSET_SECRET_VAR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["webhook", "acme", "--nats-url", "nats://127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err


async def _all_acknowledged(nc: NATS, forwarder: WebhookForwarder) -> bool:
    info = await nc.jetstream().consumer_info(STREAM_NAME, forwarder.subscription.consumer)
    return (info.num_pending, info.num_ack_pending) == (0, 0)
