"""Issue 14, finding 8: webhook deliveries are signed the Standard Webhooks way (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), so a
receiver refuses a replayed old delivery as well as a forged or altered one, with our verifier or the
``standardwebhooks`` package; a header that is not ASCII is refused, never a crash."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from standardwebhooks import Webhook, WebhookVerificationError

from core.log.handler import CommandHandler
from integrations.consumer import EventSubscription
from integrations.webhook import (
    DEFAULT_TOLERANCE_SECONDS,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookForwarder,
    WebhookRefused,
    sign_delivery,
    verify_delivery,
    webhook_secret,
)
from tests.integrations.conftest import handler, nc, org, receiver, store
from tests.integrations.helpers import submit, wait_for
from tests.integrations.receiver import SECRET, Receiver

__all__ = ["handler", "nc", "org", "receiver", "store"]

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
BODY = b'{"delivery_id":"hook@acme:7","event":{"type":"TaskSubmitted"}}'


def signed_headers(body: bytes = BODY, *, at: datetime = NOW, delivery_id: str = "hook@acme:7") -> dict[str, str]:
    return {
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(int(at.timestamp())),
        SIGNATURE_HEADER: sign_delivery(SECRET, delivery_id, at, body),
    }


def refusal(body: bytes, headers: dict[str, str], *, now: datetime = NOW, secret: bytes | str = SECRET) -> str | None:
    try:
        verify_delivery(body, headers, secret, now=now)
    except WebhookRefused as refused:
        return str(refused)
    return None


@pytest.fixture
async def forwarding(nc: NATS, org: str, receiver: Receiver) -> AsyncIterator[Callable[..., WebhookForwarder]]:
    started: list[tuple[WebhookForwarder, asyncio.Task[None], httpx.AsyncClient]] = []

    def start(**options: object) -> WebhookForwarder:
        subscription = EventSubscription(nc, org, "signed", types={"TaskSubmitted"}, retry_delay=0.05)
        client = httpx.AsyncClient(timeout=5, trust_env=False)
        forwarder = WebhookForwarder(subscription, receiver.url, SECRET, client=client, **options)  # type: ignore[arg-type]
        started.append((forwarder, asyncio.create_task(forwarder.run()), client))
        return forwarder

    yield start
    for forwarder, running, client in started:
        forwarder.stop()
        await asyncio.wait_for(running, 10)
        await client.aclose()


async def test_a_receiver_verifies_a_delivery_with_our_verifier_and_the_standard_library(
    handler: CommandHandler, org: str, receiver: Receiver, forwarding: Callable[..., WebhookForwarder]
) -> None:
    forwarding()
    seq = await submit(handler, org, "signed-delivery")
    await wait_for(lambda: len(receiver.attempts(org, "signed-delivery")) == 1)
    [request] = receiver.attempts(org, "signed-delivery")
    assert request.signed, request.refused
    headers = request.headers
    assert headers["webhook-id"] == headers["x-cp-delivery-id"] == f"signed@{org}:{seq}"
    assert abs(int(headers["webhook-timestamp"]) - datetime.now(UTC).timestamp()) < 60
    assert headers["webhook-signature"].startswith("v1,")
    assert "x-cp-signature" not in headers  # the old body-only signature could be replayed forever
    # What a receiver in any language does with a Standard Webhooks library and the whsec_ secret:
    standard = Webhook("whsec_" + base64.b64encode(SECRET).decode())
    assert standard.verify(request.body, headers)["event"]["task_id"] == "signed-delivery"


async def test_a_stale_delivery_is_refused(
    handler: CommandHandler, org: str, receiver: Receiver, forwarding: Callable[..., WebhookForwarder]
) -> None:
    forwarding(clock=lambda: datetime.now(UTC) - timedelta(seconds=DEFAULT_TOLERANCE_SECONDS + 60))
    await submit(handler, org, "replayed-later")
    await wait_for(lambda: len(receiver.attempts(org, "replayed-later")) >= 1)
    request = receiver.attempts(org, "replayed-later")[0]
    assert not request.signed
    assert request.refused is not None and "too old" in request.refused
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(request.body, request.headers)

    headers = signed_headers()
    assert refusal(BODY, headers) is None
    assert refusal(BODY, headers, now=NOW + timedelta(seconds=DEFAULT_TOLERANCE_SECONDS)) is None
    stale = refusal(BODY, headers, now=NOW + timedelta(seconds=DEFAULT_TOLERANCE_SECONDS + 1))
    assert stale is not None and "too old" in stale
    early = refusal(BODY, headers, now=NOW - timedelta(seconds=DEFAULT_TOLERANCE_SECONDS + 1))
    assert early is not None and "in the future" in early


def test_a_tampered_delivery_is_refused() -> None:
    headers = signed_headers()
    assert refusal(BODY, headers) is None
    later = NOW + timedelta(seconds=30)
    tampered = {
        "body": (BODY.replace(b"acme", b"acmf"), headers),
        "timestamp moved": (BODY, {**headers, TIMESTAMP_HEADER: str(int(later.timestamp()))}),
        "another delivery id": (BODY, {**headers, ID_HEADER: "hook@acme:8"}),
        "signature": (BODY, {**headers, SIGNATURE_HEADER: "v1," + base64.b64encode(b"\0" * 32).decode()}),
        "no signature": (BODY, {k: v for k, v in headers.items() if k != SIGNATURE_HEADER}),
        "no timestamp": (BODY, {k: v for k, v in headers.items() if k != TIMESTAMP_HEADER}),
    }
    for name, (body, changed) in tampered.items():
        assert refusal(body, changed, now=later) is not None, name
    assert refusal(BODY, headers, secret=SECRET + b"x") is not None
    # Headers as a framework hands them over: any case.
    assert refusal(BODY, {name.title(): value for name, value in headers.items()}) is None
    # Key rotation: a receiver accepts any of the space-separated signatures.
    rotated = f"v1,{base64.b64encode(b'old' * 11).decode()} {headers[SIGNATURE_HEADER]}"
    assert refusal(BODY, {**headers, SIGNATURE_HEADER: rotated}) is None


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (SIGNATURE_HEADER, "v1,é" + "A" * 43),
        (SIGNATURE_HEADER, "v1,\uff21\uff22\uff23"),
        (SIGNATURE_HEADER, "\udcff"),
        (TIMESTAMP_HEADER, "".join(chr(0xFF10 + int(d)) for d in "1765022400")),  # fullwidth digits: float() takes them
        (TIMESTAMP_HEADER, "nan"),
        (TIMESTAMP_HEADER, "1e10"),
        (ID_HEADER, "hook@acme:\uff17"),
    ],
)
def test_a_malformed_or_non_ascii_header_is_refused_not_a_crash(header: str, value: str) -> None:
    problem = refusal(BODY, {**signed_headers(), header: value})
    assert problem is not None and header in problem


async def test_a_non_ascii_signature_over_http_is_refused_by_the_receiver(receiver: Receiver) -> None:
    headers = [(name.encode(), value.encode()) for name, value in signed_headers().items()]
    headers = [(name, b"v1,\xc3\xa9\xff" if name == SIGNATURE_HEADER.encode() else value) for name, value in headers]
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        response = await client.post(receiver.url, content=BODY, headers=headers)
    assert response.status_code == 200  # the receiver answered: it did not crash
    request = receiver.received[-1]
    assert not request.signed and request.refused is not None and "not ASCII" in request.refused


def test_secrets_are_read_the_standard_way_or_as_plain_text() -> None:
    raw = b"\x01\x02 32 random bytes, give or take"
    assert webhook_secret("whsec_" + base64.b64encode(raw).decode()) == raw
    assert webhook_secret("0123abcd-hex-from-openssl") == b"0123abcd-hex-from-openssl"
    for bad in ("", "whsec_", "whsec_not base64!"):
        with pytest.raises(ValueError, match="whsec_"):
            webhook_secret(bad)


@given(
    body=st.binary(max_size=256),
    secret=st.binary(min_size=1, max_size=64),
    delivery=st.from_regex(r"[a-z0-9_-]{1,20}@[a-z0-9_-]{1,20}:[0-9]{1,6}", fullmatch=True),
    skew=st.integers(-DEFAULT_TOLERANCE_SECONDS, DEFAULT_TOLERANCE_SECONDS),
    flip=st.integers(min_value=0),
)
def test_a_signature_verifies_only_for_its_own_body_id_time_and_secret(
    body: bytes, secret: bytes, delivery: str, skew: int, flip: int
) -> None:
    headers = {
        ID_HEADER: delivery,
        TIMESTAMP_HEADER: str(int(NOW.timestamp())),
        SIGNATURE_HEADER: sign_delivery(secret, delivery, NOW, body),
    }
    verify_delivery(body, headers, secret, now=NOW + timedelta(seconds=skew))
    with pytest.raises(WebhookRefused):
        verify_delivery(body + b" ", headers, secret, now=NOW)
    with pytest.raises(WebhookRefused):
        verify_delivery(body, headers, secret + b"x", now=NOW)
    with pytest.raises(WebhookRefused):
        verify_delivery(body, {**headers, ID_HEADER: delivery + "0"}, secret, now=NOW)
    if body:
        index = flip % len(body)
        tampered = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
        with pytest.raises(WebhookRefused):
            verify_delivery(tampered, headers, secret, now=NOW)


def test_the_body_says_what_the_headers_route_on() -> None:
    """Only the body, id and timestamp are signed: routing headers repeat what the body holds."""
    body = json.loads(BODY)
    assert body["delivery_id"] == signed_headers()[ID_HEADER]
