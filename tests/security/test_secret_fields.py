"""Issue 14, finding 2: secret material never leaves through readers. The log keeps an API key's secret
hash (the keys read model is rebuilt from it); the org feed (SSE), webhooks, integration consumers and
the auditors' export show every event with its secret fields redacted, in the same shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
import pytest
from nats.aio.client import Client as NATS

from controlplane.embedded import EmbeddedNats
from controlplane.export import export_org
from controlplane.task_log import opened
from core.domain.access import issue_key, parse_key
from core.domain.audit import verify_export
from core.domain.commands import SYSTEM, CreateApiKey
from core.domain.events import EVENT_TYPES, ApiKeyCreated, TaskSubmitted, decode_event
from core.domain.public import (
    REDACTED,
    public_bytes,
    public_event,
    public_payload,
    public_view,
    redacted_fields,
)
from core.log.handler import CommandHandler
from integrations.consumer import DeadLetter, Delivery, EventSubscription
from integrations.webhook import WebhookForwarder
from tests.gateway.conftest import Stack
from tests.integrations.conftest import handler, nc, org, receiver, store
from tests.integrations.helpers import dead_lettered, dead_letters, wait_for
from tests.integrations.receiver import SECRET, Receiver
from tests.security.test_lease_binding import security_stack  # this module's own stack, as `stack`

__all__ = ["handler", "nc", "org", "receiver", "security_stack", "store"]

AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def a_key_created(secret_sha256: str = "ab" * 32) -> ApiKeyCreated:
    return ApiKeyCreated(
        at=AT, key_id="k1", name="ci", roles=("viewer",), secret_sha256=secret_sha256, created_by="system"
    )


async def create_key(handler: CommandHandler, org: str) -> tuple[str, str]:
    """A new API key of ``org``, written to the log as the gateway does; returns (key id, secret hash)."""
    issued = issue_key()
    command = CreateApiKey(key_id=issued.key_id, name="probe", roles=("viewer",), secret_sha256=issued.secret_sha256)
    await handler.handle(org, command, actor=SYSTEM)
    return issued.key_id, issued.secret_sha256


# --- the one place that knows ---------------------------------------------------------------------


def test_every_declared_secret_field_is_a_field_of_its_event() -> None:
    for tag, cls in EVENT_TYPES.items():
        fields = {field.encode_name for field in msgspec.structs.fields(cls)}
        assert fields >= cls.SECRET_FIELDS, tag
    assert frozenset({"secret_sha256"}) == ApiKeyCreated.SECRET_FIELDS


def test_the_public_view_redacts_secret_fields_and_keeps_the_event_shape() -> None:
    event = a_key_created()
    view = public_view(event)
    assert view == {**msgspec.to_builtins(event), "secret_sha256": REDACTED}
    assert "ab" * 32 not in json.dumps(view)
    hidden = public_event(event)
    assert type(hidden) is ApiKeyCreated and hidden.secret_sha256 == REDACTED and hidden.key_id == "k1"
    assert decode_event(msgspec.json.encode(hidden)) == hidden  # still a valid event of its type
    submitted = TaskSubmitted(
        at=AT,
        task_id="t",
        org="acme",
        queue="default",
        task_type="deploy",
        payload={"secret_sha256": "kept: payloads are the submitter's own data"},
        priority="normal",
        required_capabilities=(),
        max_retries=0,
        timeout_seconds=None,
        retry_backoff_seconds=1.0,
        metadata={},
        workflow=None,
        submitted_by="alice",
    )
    assert public_event(submitted) is submitted


def test_stored_payloads_are_redacted_by_their_type_tag_and_anything_else_passes_unchanged() -> None:
    stored = msgspec.json.encode(a_key_created())
    assert public_payload(msgspec.json.decode(stored))["secret_sha256"] == REDACTED
    assert b"ab" * 32 not in public_bytes(stored)
    assert decode_event(public_bytes(stored)) == public_event(a_key_created())
    for untouched in (b"not json", b'{"type":"TaskResumed","v":1,"at":"2026-12-06T12:00:00Z","by":"x"}', b"[1]"):
        assert public_bytes(untouched) == untouched
    assert public_payload({"type": "SomethingNewer", "secret_sha256": "x"}) == {
        "type": "SomethingNewer",
        "secret_sha256": "x",
    }


# --- the exits --------------------------------------------------------------------------------------


async def test_the_org_feed_shows_a_viewer_no_key_hash(stack: Stack) -> None:
    async with stack.client("acme", "admin") as admin:
        created = await admin.post("/v1/api-keys", json={"name": "probe", "roles": ["viewer"]})
    assert created.status_code == 201, created.text
    key_id, secret_sha256 = parse_key(created.json()["key"])  # type: ignore[misc]
    seq = created.json()["seq"]
    seen: dict[str, object] = {}
    raw: list[str] = []
    async with stack.client("acme", "viewer") as viewer:
        params = {"types": "ApiKeyCreated", "after": str(seq - 1)}
        async with asyncio.timeout(15), viewer.stream("GET", "/v1/events", params=params) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                raw.append(line)
                if line.startswith("data: "):
                    seen = json.loads(line.removeprefix("data: "))
                    break
    assert seen["key_id"] == key_id
    assert seen["secret_sha256"] == REDACTED
    assert set(seen) >= {"type", "v", "at", "key_id", "name", "roles", "created_by", "seq", "org"}
    assert not any(secret_sha256 in line for line in raw)
    # A key's own hash is no more visible than anyone else's: every seeded key of the org too.
    hashes = [parse_key(key)[1] for key in stack.keys["acme"].values()]  # type: ignore[index]
    async with stack.client("acme", "viewer") as viewer:
        body = await _read_feed(viewer, {"types": "ApiKeyCreated", "after": "0"}, until=seq)
    assert body.count(f'"secret_sha256":"{REDACTED}"') >= len(hashes)
    assert not any(digest in body for digest in hashes)


async def _read_feed(client: httpx.AsyncClient, params: dict[str, str], *, until: int) -> str:
    """The feed's raw text up to and including the event at seq ``until``."""
    lines: list[str] = []
    reached = False
    async with asyncio.timeout(15), client.stream("GET", "/v1/events", params=params) as response:
        async for line in response.aiter_lines():
            lines.append(line)
            reached = reached or line == f"id: {until}"
            if reached and not line:  # the blank line that ends that message
                break
    return "\n".join(lines)


@pytest.fixture
async def subscribed(nc: NATS, org: str) -> AsyncIterator[tuple[EventSubscription, list[Delivery]]]:
    """An integration's subscription to ``org`` whose handler records and refuses every delivery."""
    deliveries: list[Delivery] = []

    async def refuse(delivery: Delivery) -> None:
        deliveries.append(delivery)
        raise DeadLetter("this integration keeps nothing")

    subscription = EventSubscription(nc, org, "keeper", types={"ApiKeyCreated"})
    await subscription.start()
    running = asyncio.create_task(subscription.run(refuse))
    yield subscription, deliveries
    subscription.stop()
    await asyncio.wait_for(running, 10)


async def test_integration_handlers_and_dead_letters_never_get_a_key_hash(
    nc: NATS, handler: CommandHandler, org: str, subscribed: tuple[EventSubscription, list[Delivery]]
) -> None:
    subscription, deliveries = subscribed
    key_id, secret_sha256 = await create_key(handler, org)
    js = nc.jetstream()
    await wait_for(lambda: dead_lettered(js, subscription.dead_letter_subject))
    [delivery] = deliveries
    assert isinstance(delivery.event, ApiKeyCreated)
    assert (delivery.event.key_id, delivery.event.secret_sha256) == (key_id, REDACTED)
    [letter] = await dead_letters(js, subscription.dead_letter_subject)
    assert secret_sha256.encode() not in letter.data
    assert decode_event(letter.data) == delivery.event


async def test_webhooks_never_carry_a_key_hash(nc: NATS, handler: CommandHandler, org: str, receiver: Receiver) -> None:
    subscription = EventSubscription(nc, org, "hook", types={"ApiKeyCreated"})
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        forwarder = WebhookForwarder(subscription, receiver.url, SECRET, client=client)
        running = asyncio.create_task(forwarder.run())
        try:
            key_id, secret_sha256 = await create_key(handler, org)
            await wait_for(lambda: any(_key_of(request.body) == key_id for request in receiver.received))
        finally:
            forwarder.stop()
            await asyncio.wait_for(running, 10)
    [request] = [request for request in receiver.received if _key_of(request.body) == key_id]
    assert request.signed
    assert secret_sha256.encode() not in request.body
    assert json.loads(request.body)["event"]["secret_sha256"] == REDACTED
    assert not any(secret_sha256 in value for value in request.headers.values())


def _key_of(body: bytes) -> str | None:
    event = json.loads(body).get("event", {})
    return event.get("key_id") if event.get("type") == "ApiKeyCreated" else None


async def test_an_audit_export_holds_no_key_hash_and_still_verifies(
    nats_server: EmbeddedNats, handler: CommandHandler, org: str, tmp_path: Path
) -> None:
    key_id, secret_sha256 = await create_key(handler, org)
    path = tmp_path / "audit.jsonl"
    async with opened(nats_server.url) as reading:
        with path.open("wb") as out:
            chain = await export_org(reading.reader, org, out)
    exported = path.read_bytes()
    assert secret_sha256.encode() not in exported
    header, *events, end = (json.loads(line) for line in exported.splitlines())
    [created] = [line["event"] for line in events if line["event"]["type"] == "ApiKeyCreated"]
    assert created == {**created, "key_id": key_id, "secret_sha256": REDACTED}
    assert "ApiKeyCreated.secret_sha256" in header["redacted"]
    assert header["redacted"] == redacted_fields(), "the header declares every field the export redacts"
    report = verify_export(exported.splitlines(keepends=True), expected_head=chain.head)
    assert report.ok, report.problem
    assert report.head == end["hash"]
