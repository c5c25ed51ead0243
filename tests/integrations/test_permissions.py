"""An integration user confined by `controlplane nats-config` can consume its own org's events through
the API and nothing else: no other org's events (core subscription, consumer with another filter,
another consumer, direct get), no writes into the log or its timers. Against a real nats-server
whose accounts are the command's own output."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import nats
import nats.errors
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from controlplane.cli import main
from controlplane.embedded import EmbeddedNats, NatsLogin
from core.domain.ids import TOKEN_PATTERN, new_id
from core.domain.subjects import aggregate_subject, schedule_subject
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME, JetStreamEventStore
from integrations.consumer import (
    CONFINED_JS_API_PREFIX,
    H_DLQ_SUBJECT,
    Delivery,
    EventSubscription,
    consumer_name,
    dead_letter_subject,
    provision_dead_letter_stream,
)
from integrations.permissions import cp_exports, integration_permissions, integration_user, org_imports
from tests.integrations.helpers import dead_lettered, dead_letters, submit, wait_for
from tests.integrations.receiver import Receiver, webhook_command

pytestmark = pytest.mark.integration

ADMIN = {"user": "controlplane", "password": "admin-secret"}
PASSWORDS = {
    "acme": "acme-secret",
    "globex": 'g$lo"bex #{}\\ pw',  # config quoting: $ variables, quotes, comments, braces, backslash
}
VIOLATION = "permissions violation"


@dataclass
class Admin:
    """The control plane's own, unconfined connection in account CP."""

    store: JetStreamEventStore
    handler: CommandHandler


@dataclass
class Confined:
    """A connection of an org's integration user, with the permission errors the server sent it."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [error for error in self.errors if VIOLATION in error]


def _cli_output(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """Account CP holds the log (its user is unconfined, like the control plane's processes); the org
    accounts are exactly what `controlplane nats-config` prints."""
    printed = [
        _cli_output("nats-config", org, "--password", PASSWORDS[org], "--integration", "webhook")
        for org in ("acme", "globex")
    ]
    entries = ",".join("".join(line for line in text.splitlines() if not line.startswith("#")) for text in printed)
    with EmbeddedNats(
        tmp_path_factory.mktemp("confined"),
        login=NatsLogin(ADMIN["user"], ADMIN["password"]),
        accounts=json.loads(f"{{{entries}}}"),
        exports=cp_exports(),
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def admin(server: EmbeddedNats) -> AsyncIterator[Admin]:
    store = await JetStreamEventStore.connect(server.address, user=ADMIN["user"], password=ADMIN["password"])
    await provision_dead_letter_stream(store.nc.jetstream())
    handler = CommandHandler(store)
    for org, task_id in (("acme", "a1"), ("globex", "g1")):
        await submit(handler, org, task_id)
    yield Admin(store, handler)
    await store.close()


@pytest.fixture
async def acme(server: EmbeddedNats) -> AsyncIterator[Confined]:
    async with _confined(server, "acme") as connection:
        yield connection


@pytest.fixture
async def globex(server: EmbeddedNats) -> AsyncIterator[Confined]:
    async with _confined(server, "globex") as connection:
        yield connection


@contextlib.asynccontextmanager
async def _confined(server: EmbeddedNats, org: str) -> AsyncIterator[Confined]:
    errors: list[str] = []

    async def collect(error: Exception) -> None:
        errors.append(str(error).lower())

    nc = await nats.connect(
        server.address, user=f"integration-{org}", password=PASSWORDS[org], error_cb=collect, allow_reconnect=False
    )
    connection = Confined(nc, errors)
    try:
        yield connection
    finally:
        await connection.nc.close()


def _confined_js(connection: Confined) -> nats.js.JetStreamContext:
    return connection.nc.jetstream(prefix=CONFINED_JS_API_PREFIX, timeout=1)


async def _expect_refusal(connection: Confined, subject: str) -> None:
    """The server told this connection it may not publish to ``subject``."""
    await wait_for(lambda: any(subject.lower() in error for error in connection.violations()), within=5)


async def test_confined_user_consumes_its_own_org_and_dead_letters_through_the_api(
    admin: Admin, acme: Confined
) -> None:
    poison, last = fresh("poison"), fresh("a")
    await submit(admin.handler, "globex", fresh("g"))
    await submit(admin.handler, "acme", poison)
    await submit(admin.handler, "acme", last)
    seen: list[str] = []

    async def handle(delivery: Delivery) -> None:
        seen.append(delivery.subject)
        if delivery.subject == aggregate_subject("acme", "task", poison):
            raise RuntimeError("poison")

    subscription = EventSubscription(
        acme.nc,
        "acme",
        "webhook",
        max_deliveries=2,
        retry_delay=0.05,
        js_api_prefix=CONFINED_JS_API_PREFIX,
        ensure_dead_letter_stream=False,
    )
    running = asyncio.create_task(subscription.run(handle))
    admin_js = admin.store.nc.jetstream()
    try:
        await wait_for(lambda: dead_lettered(admin_js, dead_letter_subject("acme", "webhook")))
        await wait_for(lambda: aggregate_subject("acme", "task", last) in seen)
    finally:
        subscription.stop()
        await asyncio.wait_for(running, 10)
    assert seen and all(subject.startswith("cp.acme.") for subject in seen)
    assert seen.count(aggregate_subject("acme", "task", poison)) == 2
    [letter] = await dead_letters(admin_js, dead_letter_subject("acme", "webhook"))
    assert (letter.headers or {})[H_DLQ_SUBJECT] == aggregate_subject("acme", "task", poison)
    info = await admin_js.consumer_info(STREAM_NAME, consumer_name("acme", "webhook"))
    assert info.config.filter_subject == "cp.acme.>"
    assert acme.violations() == []


@pytest.mark.parametrize("subject", ["cp.globex.>", "cp.>", ">", "cpsched.>", "cp.globex.task.*", "cpdlq.>"])
async def test_confined_user_cannot_subscribe_to_other_orgs_events(admin: Admin, acme: Confined, subject: str) -> None:
    received: list[Msg] = []

    async def keep(msg: Msg) -> None:
        received.append(msg)

    await acme.nc.subscribe(subject, cb=keep)
    await wait_for(lambda: any(f'subscription to "{subject.lower()}"' in error for error in acme.violations()))
    await submit(admin.handler, "globex", fresh("g"))
    await acme.nc.flush()
    await asyncio.sleep(0.2)
    assert received == []


async def test_confined_user_cannot_create_a_consumer_on_another_orgs_events(admin: Admin, acme: Confined) -> None:
    js = _confined_js(acme)
    for name, filter_subject in [("webhook@globex", "cp.globex.>"), ("webhook@acme", "cp.globex.>"), ("x", "cp.>")]:
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_consumer(
                STREAM_NAME, ConsumerConfig(name=name, durable_name=name, filter_subject=filter_subject)
            )
        await _expect_refusal(acme, f"{CONFINED_JS_API_PREFIX}.CONSUMER.CREATE.{STREAM_NAME}.{name}.{filter_subject}")
    for subject in [
        f"$JS.API.CONSUMER.CREATE.{STREAM_NAME}.webhook@globex.cp.globex.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM_NAME}.webhook@globex",
        f"$JS.API.CONSUMER.CREATE.{STREAM_NAME}",
    ]:
        await acme.nc.publish(subject, _create_body("webhook@globex", filter_subject="cp.globex.>"), reply="_INBOX.x")
        await _expect_refusal(acme, subject)

    # The one create subject it may use pins the filter; the server holds the body to it.
    allowed = f"{CONFINED_JS_API_PREFIX}.CONSUMER.CREATE.{STREAM_NAME}.webhook@acme.cp.acme.>"
    other_filter = await acme.nc.request(allowed, _create_body("webhook@acme", filter_subject="cp.globex.>"))
    assert json.loads(other_filter.data)["error"]["err_code"] == 10131
    several = await acme.nc.request(allowed, _create_body("webhook@acme", filter_subjects=["cp.globex.>"]))
    assert json.loads(several.data)["error"]["err_code"] == 10137
    no_filter = await acme.nc.request(allowed, _create_body("webhook@acme"))
    assert json.loads(no_filter.data)["error"]["err_code"] == 10131

    consumers = await admin.store.nc.jetstream().consumers_info(STREAM_NAME)
    assert {info.name for info in consumers} <= {"webhook@acme", "webhook@globex"}
    assert all(info.config.filter_subject == f"cp.{info.name.split('@')[1]}.>" for info in consumers)


async def test_confined_user_cannot_fetch_from_another_orgs_consumer(
    admin: Admin, acme: Confined, globex: Confined
) -> None:
    await submit(admin.handler, "globex", fresh("g"))
    globex_subscription = EventSubscription(
        globex.nc, "globex", "webhook", js_api_prefix=CONFINED_JS_API_PREFIX, ensure_dead_letter_stream=False
    )
    await globex_subscription.start()  # globex's own user may create and use its consumer
    admin_js = admin.store.nc.jetstream()
    before = await admin_js.consumer_info(STREAM_NAME, "webhook@globex")
    inbox = acme.nc.new_inbox()
    received: list[Msg] = []

    async def keep(msg: Msg) -> None:
        received.append(msg)

    await acme.nc.subscribe(inbox, cb=keep)
    for prefix in (CONFINED_JS_API_PREFIX, "$JS.API"):
        subject = f"{prefix}.CONSUMER.MSG.NEXT.{STREAM_NAME}.webhook@globex"
        await acme.nc.publish(subject, b'{"batch": 10}', reply=inbox)
        await _expect_refusal(acme, subject)
        info_subject = f"{prefix}.CONSUMER.INFO.{STREAM_NAME}.webhook@globex"
        await acme.nc.publish(info_subject, b"", reply=inbox)
        await _expect_refusal(acme, info_subject)
    await asyncio.sleep(0.2)
    after = await admin_js.consumer_info(STREAM_NAME, "webhook@globex")
    assert received == []
    assert after.delivered.consumer_seq == before.delivered.consumer_seq
    assert globex.violations() == []


async def test_confined_user_cannot_read_the_log_by_direct_get(admin: Admin, acme: Confined) -> None:
    inbox = acme.nc.new_inbox()
    received: list[Msg] = []

    async def keep(msg: Msg) -> None:
        received.append(msg)

    await acme.nc.subscribe(inbox, cb=keep)
    for subject, body in [
        (f"$JS.API.DIRECT.GET.{STREAM_NAME}", b'{"seq": 1}'),
        (f"$JS.API.DIRECT.GET.{STREAM_NAME}.cp.globex.task.g1", b""),
        (f"$JS.API.DIRECT.GET.{STREAM_NAME}.cp.acme.task.a1", b""),
        (f"$JS.API.STREAM.MSG.GET.{STREAM_NAME}", b'{"last_by_subj": "cp.globex.task.g1"}'),
        (f"{CONFINED_JS_API_PREFIX}.DIRECT.GET.{STREAM_NAME}", b'{"seq": 1}'),
        (f"{CONFINED_JS_API_PREFIX}.STREAM.MSG.GET.{STREAM_NAME}", b'{"seq": 1}'),
    ]:
        await acme.nc.publish(subject, body, reply=inbox)
        await _expect_refusal(acme, subject)
    await acme.nc.flush()
    await asyncio.sleep(0.2)
    assert received == []


async def test_confined_user_cannot_write_into_the_log_or_its_timers(admin: Admin, acme: Confined) -> None:
    pending = fresh("pending")
    await submit(admin.handler, "acme", pending)  # something for a fetch to deliver
    subscription = EventSubscription(
        acme.nc, "acme", "webhook", js_api_prefix=CONFINED_JS_API_PREFIX, ensure_dead_letter_stream=False
    )
    await subscription.start()
    last_seq = await admin.store.last_seq()
    event = b'{"type":"TaskCancelled","v":1,"at":"2026-01-01T00:00:00Z","by":"mallory","reason":null}'
    own_task = aggregate_subject("acme", "task", pending)
    for subject in [
        own_task,
        aggregate_subject("globex", "task", "g1"),
        schedule_subject(own_task, "lease-x"),
        f"$JS.API.STREAM.PURGE.{STREAM_NAME}",
        f"$JS.API.STREAM.DELETE.{STREAM_NAME}",
        f"$JS.API.STREAM.CREATE.{STREAM_NAME}",
    ]:
        await acme.nc.publish(subject, event, headers={"Nats-Schedule": "@at 2026-01-01T00:00:00Z"})
        await _expect_refusal(acme, subject)

    # A request it may send, with its answer addressed to the log: in one account the server would
    # deliver the event there (measured on 2.15); across accounts the reply is remapped into the org's own.
    next_subject = f"{CONFINED_JS_API_PREFIX}.CONSUMER.MSG.NEXT.{STREAM_NAME}.webhook@acme"
    await acme.nc.publish(next_subject, b'{"batch": 1}', reply=aggregate_subject("globex", "task", "stolen"))
    # A push consumer aimed at the log is refused by the server.
    create = f"{CONFINED_JS_API_PREFIX}.CONSUMER.CREATE.{STREAM_NAME}.webhook@acme.cp.acme.>"
    push = await acme.nc.request(create, _create_body("webhook@acme", "cp.acme.>", deliver_subject="cp.globex.task.x"))
    assert json.loads(push.data)["error"]["err_code"] == 10081  # deliver subject forms a cycle

    await asyncio.sleep(0.3)
    assert await admin.store.last_seq() == last_seq  # nothing reached CP_EVENTS: no event, no timer
    assert not any(next_subject.lower() in error for error in acme.errors)  # the request itself was allowed


async def test_the_webhook_command_forwards_as_the_confined_user(
    server: EmbeddedNats, admin: Admin, receiver: Receiver
) -> None:
    ours, theirs = fresh("hooked"), fresh("g")
    async with webhook_command(
        "acme",
        "--confined",
        "--url",
        receiver.url,
        "--nats-url",
        server.address,
        "--nats-user",
        "integration-acme",
        "--nats-password-env",
        "TEST_NATS_PASSWORD",
        env={"TEST_NATS_PASSWORD": PASSWORDS["acme"]},
    ) as process:
        await submit(admin.handler, "globex", theirs)
        await submit(admin.handler, "acme", ours)
        await wait_for(lambda: len(receiver.attempts("acme", ours)) == 1)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    assert receiver.attempts("acme", ours)[0].signed
    assert receiver.attempts("globex", theirs) == []


async def test_nats_config_prints_an_nkey_user_and_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    nkey = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"
    assert main(["nats-config", "acme", "--nkey", nkey]) == 0
    assert f'"nkey": "{nkey}"' in capsys.readouterr().out
    assert main(["nats-config", "acme", "--nkey", nkey[:-1] + "5"]) == 2
    assert "checksum does not match" in capsys.readouterr().err
    assert main(["nats-config", "Acme.>"]) == 2
    assert "invalid org" in capsys.readouterr().err
    assert main(["nats-config", "acme", "--integration", "web hook", "--password", "x"]) == 2
    assert "invalid integration name" in capsys.readouterr().err
    assert main(["nats-config", "acme", "--password", "line\nbreak"]) == 2
    assert "invalid password" in capsys.readouterr().err
    assert main(["nats-config", "acme"]) == 0
    captured = capsys.readouterr()
    assert "generated a password for integration-acme" in captured.err
    assert '"user": "integration-acme"' in captured.out


_token = st.from_regex(TOKEN_PATTERN.replace("{0,62}", "{0,8}"), fullmatch=True)


@given(
    org=_token,
    other=_token,
    names=st.lists(_token, min_size=1, max_size=3),
    other_names=st.lists(_token, min_size=1, max_size=3),
)
def test_an_orgs_permissions_and_imports_grant_nothing_on_another_orgs_subjects(
    org: str, other: str, names: list[str], other_names: list[str]
) -> None:
    assume(org != other)
    granted = _granted_patterns(org, names)
    theirs = [_literal(pattern) for pattern in _granted_patterns(other, other_names)]
    theirs += [f"cp.{other}.task.t1", f"cpsched.{other}.task.t1.lease-1", dead_letter_subject(other, other_names[0])]
    assert not [(pattern, subject) for pattern in granted for subject in theirs if _matches(pattern, subject)]


def test_a_user_entry_needs_exactly_one_way_to_log_in() -> None:
    with pytest.raises(ValueError, match="password or an nkey"):
        integration_user("acme")
    with pytest.raises(ValueError, match="--nkey alone"):
        integration_user("acme", password="x", nkey="UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4")


def _granted_patterns(org: str, names: list[str]) -> list[str]:
    """What the user may publish and what its account imports from CP. (It may subscribe only to
    _INBOX.>, which is its own account's.)"""
    permissions = integration_permissions(org, names)
    imports = org_imports(org, names)
    return [*permissions["publish"]["allow"], *(entry["service"]["subject"] for entry in imports)]


def fresh(prefix: str) -> str:
    """A task id no other test on this module's server uses."""
    return f"{prefix}-{new_id()[-10:]}"


def _literal(pattern: str) -> str:
    return ".".join("x" if token in ("*", ">") else token for token in pattern.split("."))


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` one or more at the end."""
    pattern_tokens, subject_tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens) or token not in ("*", subject_tokens[index]):
            return False
    return len(pattern_tokens) == len(subject_tokens)


def _create_body(name: str, filter_subject: str | None = None, **config: object) -> bytes:
    body = {"name": name, "durable_name": name, "ack_policy": "explicit", **config}
    if filter_subject is not None:
        body["filter_subject"] = filter_subject
    return json.dumps({"stream_name": STREAM_NAME, "config": body}).encode()
