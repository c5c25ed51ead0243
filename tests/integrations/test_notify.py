"""The notifier end to end: a whole stack of its own (nats-server, PostgreSQL, gateway, projector), an
SMTP server in the test (aiosmtpd) and a local HTTP receiver. An approval reaches both with a console
link that shows it; rules filter by queue, environment and workflow; an escalation sends a reminder; a
failing channel is retried, then dead-lettered and recorded; and a notifier killed with SIGKILL while a
message is in flight, then restarted, leaves each receiver with the message once by its id and the log
with one NotificationSent per rule and event."""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from controlplane.embedded import EmbeddedNats, free_port
from controlplane.seed import seed_org
from core.domain.events import NotificationDeadLettered, NotificationSent
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.domain.subjects import org_events_filter
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME, JetStreamEventStore
from core.secret_box import MASTER_KEY_ENV
from integrations.consumer import Delivery, dead_letter_subject, filter_subjects_of
from integrations.notify import Notifier, notifier_subscription
from tests.gateway.conftest import ROLES, Stack, own_database, serve_stack
from tests.gateway.test_api import queue, submit
from tests.gateway.test_console_http import sign_in
from tests.integrations.helpers import dead_letters, wait_for
from tests.integrations.receiver import SECRET, Receiver

pytestmark = pytest.mark.integration


# --- servers ----------------------------------------------------------------------------------------


@dataclass
class Served:
    nats_url: str
    stack: Stack


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Served]:
    """A stack of its own: the session's NATS has the gateway tests' projector on it, and a second
    projector would share its durable consumers."""
    with EmbeddedNats(tmp_path_factory.mktemp("notify-nats")) as nats_server:
        async with own_database(database_url, "notify") as database, serve_stack(nats_server.url, database) as stack:
            yield Served(nats_server.url, stack)


@dataclass
class Mailbox:
    """What the SMTP server took, and what it answers: ``answer(message, attempt)`` is an SMTP reply, or a
    number of seconds to wait before answering 250 (the attempt counts messages with that Message-ID)."""

    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    answer: Callable[[EmailMessage, int], str | float] = lambda message, attempt: "250 OK"
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # aiosmtpd calls it so
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.messages.append(message)
            attempt = len(self.for_id(message["Message-ID"]))
        answer = self.answer(message, attempt)
        if isinstance(answer, float | int):
            await asyncio.sleep(answer)
            return "250 OK"
        return answer

    def for_id(self, message_id: str) -> list[EmailMessage]:
        return [message for message in list(self.messages) if message["Message-ID"] == message_id]

    def about(self, task_id: str) -> list[EmailMessage]:
        return [message for message in list(self.messages) if f"Task {task_id} " in text(message)]


def text(message: EmailMessage) -> str:
    content = message.get_content()
    assert isinstance(content, str)
    return content


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(port=free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    yield box
    controller.stop()


@pytest.fixture
def answers(mailbox: Mailbox, receiver: Receiver) -> Iterator[None]:
    """Each test starts with both receivers answering 2xx."""
    yield
    mailbox.answer = lambda message, attempt: "250 OK"
    receiver.answer = lambda task_id, attempt: 200


# --- an org with channels and rules ---------------------------------------------------------------


@dataclass
class Org:
    name: str
    keys: dict[str, str]
    stack: Stack

    def api(self, role: str = "admin") -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.stack.url, headers={"Authorization": f"Bearer {self.keys[role]}"})

    async def define(self, path: str, spec: dict[str, Any]) -> dict[str, Any]:
        async with self.api() as api:
            answer = await api.post(path, json=spec)
        assert answer.status_code == 201, answer.text
        return answer.json()

    async def channels(self, mailbox: Mailbox, receiver: Receiver) -> None:
        """``mail`` (the SMTP server) and ``hook`` (the receiver, signed with its secret)."""
        smtp = {"host": "127.0.0.1", "port": mailbox.port, "from": "cp@example.com", "to": ["ops@example.com"]}
        await self.define("/v1/notification-channels", {"name": "mail", "kind": "email", "smtp": smtp})
        hook = {"name": "hook", "kind": "webhook", "url": receiver.url, "secret": SECRET.decode()}
        await self.define("/v1/notification-channels", hook)

    async def rule(self, rule_id: str, channel: str, on: list[str], **filters: str) -> None:
        await self.define("/v1/notification-rules", {"id": rule_id, "channel": channel, "on": on, **filters})

    async def records(self) -> list[RecordedEvent]:
        """Every NotificationSent and NotificationDeadLettered of the org, in log order."""
        events = await self.stack.services.store.read_subject(f"cp.{self.name}.notification.>")
        assert all(isinstance(item.event, NotificationSent | NotificationDeadLettered) for item in events)
        return events


@pytest.fixture
async def org(served: Served) -> Org:
    name = f"n{new_id()[-10:]}"
    return Org(name, await seed_org(served.stack.services.handler, name, ROLES), served.stack)


async def approval_asked(api: httpx.AsyncClient, q: str, workflow: str | None = None, **request: Any) -> dict[str, Any]:
    """Submit a task on ``q``, claim it, and ask for an approval; the approval."""
    task = await submit(api, q, **({"workflow": {"name": workflow}} if workflow else {}))
    capabilities = [f"workflow:{workflow}", f"workflow:{workflow}@v1"] if workflow else []
    claimed = await api.post("/v1/tasks/claim", json={"worker_id": "w1", "queue": q, "capabilities": capabilities})
    assert claimed.status_code == 200, claimed.text
    body = {"worker_id": "w1", "lease_id": claimed.json()["lease"]["id"], "reason": "ship v2?", **request}
    asked = await api.post(f"/v1/tasks/{task['id']}/approval-requests", json=body)
    assert asked.status_code == 201, asked.text
    return asked.json()


# --- the notifier, in this process ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def notifying(served: Served, org: Org, **options: Any) -> AsyncIterator[Notifier]:
    store = await JetStreamEventStore.connect(served.nats_url)
    handler = CommandHandler(store)
    subscription = notifier_subscription(
        store.nc,
        org.name,
        "notify",
        retry_delay=0.05,
        max_retry_delay=0.2,
        **options,
    )
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        assert served.stack.services.secret_box is not None
        notifier = Notifier(
            subscription, store, handler, console_url=served.stack.url, http=http, box=served.stack.services.secret_box
        )
        await notifier.start()
        running = asyncio.create_task(notifier.run())
        try:
            yield notifier
        finally:
            notifier.stop()
            await asyncio.wait_for(running, 10)
            await store.close()


async def test_an_approval_reaches_smtp_and_the_webhook_once_with_a_console_link_that_shows_it(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    await org.rule("by-mail", "mail", ["approval_requested"])
    await org.rule("by-hook", "hook", ["approval_requested"])
    async with notifying(served, org), org.api() as api:
        approval = await approval_asked(
            api, queue(), details={"plan": "roll out 3 pods"}, approvers=["role:approver"], timeout_seconds=3600
        )
        task_id = approval["task_id"]
        await wait_for(lambda: len(mailbox.about(task_id)) == 1 and len(receiver.attempts(org.name, task_id)) == 1)
        await wait_for(lambda: _count(org, NotificationSent, 2))

    link = f"{served.stack.url}/console/approvals#approval-{approval['id']}"
    [mail] = mailbox.about(task_id)
    body_text = text(mail)
    assert mail["Subject"] == f"[{org.name}] Approval requested: ship v2?"
    assert f"Open: {link}" in body_text and "Waits for: role:approver" in body_text
    assert "roll out 3 pods" in body_text and f"Until: {approval['expires_at'][:10]}" in body_text
    [delivery] = receiver.attempts(org.name, task_id)
    assert delivery.signed, delivery.refused
    body = json.loads(delivery.body)
    assert (body["link"], body["trigger"], body["approval"]["id"]) == (link, "approval_requested", approval["id"])

    records = {item.event.rule_id: item.event for item in await org.records()}
    assert records["by-mail"].message_id == mail["Message-ID"]
    assert records["by-hook"].message_id == delivery.headers["webhook-id"] == body["notification_id"]
    assert {event.approval_id for event in records.values()} == {approval["id"]}

    async with sign_in(served.stack, org.keys["approver"]) as browser:
        path = link.removeprefix(served.stack.url).partition("#")[0]

        async def shows_it() -> bool:
            page = await browser.get(path)
            assert page.status_code == 200
            return f'id="approval-{approval["id"]}"' in page.text

        await wait_for(shows_it)  # the inbox reads the read model, a moment behind the log


async def test_rules_filter_by_queue_environment_and_workflow(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    q_prod, q_other, q_named = queue(), queue(), queue()
    await org.define("/v1/environments", {"name": "prod", "queues": [q_prod]})
    await org.rule("in-prod", "hook", ["approval_requested"], environment="prod")
    await org.rule("on-named", "hook", ["approval_requested"], queue=q_named)
    await org.rule("deploys", "hook", ["approval_requested"], workflow="deploy")
    async with notifying(served, org), org.api() as api:
        gated = await submit(api, q_prod)  # the shipped submit policy has a human approve what goes to prod
        assert gated["status"] == "awaiting_approval", gated
        elsewhere = await approval_asked(api, q_other)
        named = await approval_asked(api, q_named)
        deploy = await approval_asked(api, q_other, workflow="deploy")
        other_workflow = await approval_asked(api, q_other, workflow="chat")
        await wait_for(lambda: _count(org, NotificationSent, 3))
        await wait_for(lambda: _settled(served, org))
    notified = {item.event.task_id: item.event.rule_id for item in await org.records()}
    assert notified == {gated["id"]: "in-prod", named["task_id"]: "on-named", deploy["task_id"]: "deploys"}
    for quiet in (elsewhere, other_workflow):
        assert receiver.attempts(org.name, quiet["task_id"]) == []


async def test_a_slack_channel_gets_text_and_blocks_that_link_to_the_approval(
    served: Served, org: Org, receiver: Receiver, answers: None
) -> None:
    await org.define("/v1/notification-channels", {"name": "chat", "kind": "slack", "url": receiver.url})
    await org.rule("to-chat", "chat", ["approval_requested"])
    async with notifying(served, org), org.api() as api:
        approval = await approval_asked(api, queue(), reason="drop <table> & co")
        await wait_for(lambda: _count(org, NotificationSent, 1))
    [posted] = [json.loads(item.body) for item in receiver.received if approval["task_id"].encode() in item.body]
    link = f"{served.stack.url}/console/approvals#approval-{approval['id']}"
    assert posted["text"] == f"[{org.name}] Approval requested: drop <table> & co\n{link}"
    blocks = " ".join(block["text"]["text"] for block in posted["blocks"])
    assert f"<{link}|Open in the console>" in blocks and "drop &lt;table&gt; &amp; co" in blocks


async def test_an_escalation_sends_a_reminder_and_a_timeout_says_so(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    await org.rule("late", "mail", ["approval_escalated", "approval_timed_out"])
    async with notifying(served, org), org.api() as api:
        approval = await approval_asked(
            api, queue(), timeout_seconds=3, escalation={"after_seconds": 1, "approvers": ["key:oncall"]}
        )
        await wait_for(lambda: len(mailbox.about(approval["task_id"])) == 2, within=20)
    reminder, closed = mailbox.about(approval["task_id"])
    assert reminder["Subject"].startswith(f"[{org.name}] Reminder: approval still waiting")
    assert "Escalated to: key:oncall" in text(reminder)
    assert closed["Subject"].startswith(f"[{org.name}] Approval timed out")
    assert [item.event.trigger for item in await org.records()] == ["approval_escalated", "approval_timed_out"]


async def test_a_failed_or_parked_task_links_to_its_run(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    await org.rule("broken", "hook", ["task_failed", "task_parked"])
    q = queue()
    async with notifying(served, org), org.api() as api:
        failing, parking = await submit(api, q), await submit(api, q)
        for task, path, extra in (
            (failing, "fail", {"retryable": False, "error": {"reason": "disk full"}}),
            (parking, "non-determinism", {"index": 0, "expected": "a", "actual": "b"}),
        ):
            claimed = await api.post("/v1/tasks/claim", json={"worker_id": "w1", "queue": q})
            assert claimed.json()["task"]["id"] == task["id"], claimed.text
            lease = {"worker_id": "w1", "lease_id": claimed.json()["lease"]["id"]}
            done = await api.post(f"/v1/tasks/{task['id']}/{path}", json={**lease, **extra})
            assert done.status_code == 200, done.text
        await wait_for(lambda: _count(org, NotificationSent, 2))
    for task, trigger in ((failing, "task_failed"), (parking, "task_parked")):
        [delivery] = receiver.attempts(org.name, task["id"])
        body = json.loads(delivery.body)
        assert (body["trigger"], body["link"]) == (trigger, f"{served.stack.url}/console/tasks/{task['id']}")
    assert "disk full" in json.loads(receiver.attempts(org.name, failing["id"])[0].body)["text"]


async def test_a_failing_channel_is_retried_then_dead_lettered_and_recorded_while_the_other_is_sent(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    await org.rule("a-mail", "mail", ["approval_requested"])
    await org.rule("b-hook", "hook", ["approval_requested"])
    mailbox.answer = lambda message, attempt: "451 4.3.0 try again later" if attempt == 1 else "250 OK"
    receiver.answer = lambda task_id, attempt: 503
    async with notifying(served, org, max_deliveries=3), org.api() as api:
        approval = await approval_asked(api, queue())
        await wait_for(lambda: _count(org, NotificationDeadLettered, 1))
        js = served.stack.services.store.nc.jetstream()
        await wait_for(lambda: dead_letters(js, dead_letter_subject(org.name, "notify")))
    task_id = approval["task_id"]
    assert len(receiver.attempts(org.name, task_id)) == 3, "max_deliveries attempts"
    assert len(mailbox.about(task_id)) == 2, "the 451 was retried, and the e-mail sent once it was taken"
    sent, dead = sorted((item.event for item in await org.records()), key=lambda event: event.rule_id)
    assert isinstance(sent, NotificationSent) and sent.rule_id == "a-mail"
    assert isinstance(dead, NotificationDeadLettered) and dead.rule_id == "b-hook" and dead.deliveries == 3
    assert "answered 503" in dead.error
    [letter] = await dead_letters(js, dead_letter_subject(org.name, "notify"))
    assert "b-hook" in (letter.headers or {})["Cp-Dlq-Error"]


async def test_a_refusing_channel_is_dead_lettered_at_once(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    await org.rule("by-mail", "mail", ["approval_requested"])
    mailbox.answer = lambda message, attempt: "550 5.7.1 relaying denied"
    async with notifying(served, org, max_deliveries=5), org.api() as api:
        approval = await approval_asked(api, queue())
        await wait_for(lambda: _count(org, NotificationDeadLettered, 1))
    assert len(mailbox.about(approval["task_id"])) == 1
    [dead] = [item.event for item in await org.records()]
    assert isinstance(dead, NotificationDeadLettered) and dead.deliveries == 1 and "550" in dead.error


async def test_an_event_delivered_again_after_its_notification_was_recorded_sends_nothing(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    """A notifier that dies after recording and before acknowledging gets the event again."""
    await org.channels(mailbox, receiver)
    await org.rule("by-hook", "hook", ["approval_requested"])
    async with notifying(served, org) as notifier, org.api() as api:
        approval = await approval_asked(api, queue())
        await wait_for(lambda: _count(org, NotificationSent, 1))
        [source] = [
            item
            for item in await served.stack.services.store.read_subject(org_events_filter(org.name))
            if type(item.event).__name__ == "ApprovalRequested"
        ]
        await notifier.handle(Delivery(source, {}, delivery_count=2))
    assert len(receiver.attempts(org.name, approval["task_id"])) == 1
    assert len(await org.records()) == 1


# --- what the notifier follows --------------------------------------------------------------------


async def _followed(served: Served, org: Org) -> tuple[list[str], int]:
    """The notifier's consumer's filter, and how many events it has delivered."""
    info = await served.stack.services.store.nc.jetstream().consumer_info(STREAM_NAME, f"notify@{org.name}")
    return filter_subjects_of(info), info.delivered.consumer_seq


async def test_an_org_without_a_rule_sends_the_notifier_none_of_its_task_events(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)  # channels, but no rule
    async with notifying(served, org), org.api() as api:
        await wait_for(lambda: _settled(served, org))
        subjects, delivered = await _followed(served, org)
        assert (subjects, delivered) == ((f"cp.{org.name}.notifications.all",), 2), "the two channels' events"
        for _ in range(3):
            await approval_asked(api, queue())
        await wait_for(lambda: _settled(served, org))
        assert await _followed(served, org) == (subjects, delivered)
    assert await org.records() == []


async def test_the_first_rule_makes_the_notifier_follow_task_events_from_that_rule_on(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    async with notifying(served, org), org.api() as api:
        before = await approval_asked(api, queue())
        await org.rule("by-hook", "hook", ["approval_requested"])
        # Asked at once: usually stored before the notifier has even seen the rule, so it is the event
        # the widened consumer must go back for.
        after = await approval_asked(api, queue())
        await wait_for(lambda: len(receiver.attempts(org.name, after["task_id"])) == 1)
        await wait_for(lambda: _settled(served, org))
        subjects, _ = await _followed(served, org)
        assert subjects == (f"cp.{org.name}.notifications.all", f"cp.{org.name}.task.*")
    assert receiver.attempts(org.name, before["task_id"]) == [], "no rule yet when it was asked"
    assert [(item.event.rule_id, item.event.task_id) for item in await org.records()] == [("by-hook", after["task_id"])]


async def test_a_notifier_restarted_after_the_last_rule_went_follows_only_the_rules_again(
    served: Served, org: Org, mailbox: Mailbox, receiver: Receiver, answers: None
) -> None:
    await org.channels(mailbox, receiver)
    await org.rule("by-hook", "hook", ["approval_requested"])
    async with notifying(served, org):
        await wait_for(lambda: _settled(served, org))
        assert len((await _followed(served, org))[0]) == 2
    async with org.api() as api:
        assert (await api.delete("/v1/notification-rules/by-hook")).status_code in (200, 204)
    # The first start after the deletion still follows task events (those before the deletion were
    # under the rule); once it has acknowledged the deletion, the next start follows the rules alone.
    async with notifying(served, org):
        await wait_for(lambda: _settled(served, org))
        assert len((await _followed(served, org))[0]) == 2
    async with notifying(served, org), org.api() as api:
        assert (await _followed(served, org))[0] == (f"cp.{org.name}.notifications.all",)
        quiet = await approval_asked(api, queue())
        await org.rule("again", "hook", ["approval_requested"])
        heard = await approval_asked(api, queue())
        await wait_for(lambda: len(receiver.attempts(org.name, heard["task_id"])) == 1)
        await wait_for(lambda: _settled(served, org))
    assert receiver.attempts(org.name, quiet["task_id"]) == []
    assert [item.event.rule_id for item in await org.records()] == ["again"]


# --- the notifier process, killed mid-delivery ----------------------------------------------------


@contextlib.asynccontextmanager
async def notify_process(served: Served, org: Org, log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``controlplane notify ORG`` (timeout 2 s: an event a dead notifier held comes back after 6 s); yields
    once it follows the log, kills it at the end if the test did not."""
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controlplane",
            "notify",
            org.name,
            "--nats-url",
            served.nats_url,
            "--public-url",
            served.stack.url,
            "--timeout",
            "2",
            "--ack-wait",
            "6",
            "--retry-delay",
            "0.1",
            env={
                **os.environ,
                "NO_PROXY": "127.0.0.1",
                "CP_LOG_FORMAT": "text",
                MASTER_KEY_ENV: served.stack.secrets_key,
            },
            stdout=log_file,
            stderr=log_file,
        )
    try:
        await wait_for(lambda: "notifying" in log_path.read_text(errors="replace"), within=30)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.parametrize("in_flight", ["webhook", "email"])
async def test_a_notifier_killed_mid_delivery_leaves_each_receiver_one_notification_by_id(
    served: Served,
    org: Org,
    mailbox: Mailbox,
    receiver: Receiver,
    answers: None,
    tmp_path: Path,
    in_flight: str,
) -> None:
    await org.channels(mailbox, receiver)
    await org.rule("a-mail", "mail", ["approval_requested"])
    await org.rule("b-hook", "hook", ["approval_requested"])
    # The first attempt of the slow channel is still unanswered when the notifier dies.
    if in_flight == "webhook":
        receiver.answer = lambda task_id, attempt: -1.5 if attempt == 1 else 200
    else:
        mailbox.answer = lambda message, attempt: 1.5 if attempt == 1 else "250 OK"
    log_path = tmp_path / "notify.log"
    async with notify_process(served, org, log_path) as first, org.api() as api:
        approval = await approval_asked(api, queue())
        task_id = approval["task_id"]
        slow = (
            (lambda: receiver.attempts(org.name, task_id))
            if in_flight == "webhook"
            else (lambda: mailbox.about(task_id))
        )
        await wait_for(lambda: len(slow()) == 1)
        first.kill()  # SIGKILL, with the message in flight
        assert await first.wait() == -9
    assert [item.event.rule_id for item in await org.records()] == (["a-mail"] if in_flight == "webhook" else [])

    async with notify_process(served, org, log_path):
        await wait_for(lambda: _count(org, NotificationSent, 2), within=30)

    mails, posts = mailbox.about(task_id), receiver.attempts(org.name, task_id)
    assert len(mails) + len(posts) == 3, "exactly the message in flight was sent again"
    assert len({mail["Message-ID"] for mail in mails}) == 1, "one e-mail by its Message-ID"
    assert len({post.headers["webhook-id"] for post in posts}) == 1, "one webhook by its id"
    assert all(post.signed for post in posts)
    records = await org.records()
    assert sorted((item.event.rule_id, item.event.source_seq) for item in records) == [
        ("a-mail", records[0].event.source_seq),
        ("b-hook", records[0].event.source_seq),
    ], "one NotificationSent per rule and event"
    ids = {item.event.rule_id: item.event.message_id for item in records}
    assert ids == {"a-mail": mails[0]["Message-ID"], "b-hook": posts[0].headers["webhook-id"]}


# --- helpers --------------------------------------------------------------------------------------


async def _count(org: Org, kind: type, expected: int) -> bool:
    found = [item for item in await org.records() if isinstance(item.event, kind)]
    assert len(found) <= expected, f"more {kind.__name__} than expected: {found}"
    return len(found) == expected


async def _settled(served: Served, org: Org) -> bool:
    """The notifier's consumer has handled and acknowledged every event of the org."""
    info = await served.stack.services.store.nc.jetstream().consumer_info(STREAM_NAME, f"notify@{org.name}")
    return info.num_pending == 0 and info.num_ack_pending == 0
