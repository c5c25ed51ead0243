"""The notifier: tells people when something waits for them, on ``integrations.consumer``.

    subscription = notifier_subscription(store.nc, "acme")
    notifier = Notifier(subscription, store,
                        CommandHandler(store), console_url="https://cp.example.com", http=client)
    await notifier.run()  # until notifier.stop()

For each event of the org that means something to people (an approval requested, by a worker or by
the submit policy's gate, escalated or timed out, a task failed or parked:
``core.domain.notification_messages.happening``, which also drops timers that changed nothing) it reads
the task from the log, finds the org's rules that match (trigger, queue, environment, workflow) and
sends each rule's message to the rule's channel:

* ``slack``: a POST of ``{"text", "blocks"}``, the shape of a Slack incoming webhook;
* ``email``: one message over SMTP (``aiosmtplib``; STARTTLS and a login when the channel says so),
  with ``Message-ID: <notification id@controlplane>``;
* ``webhook``: a POST of a JSON ``NotificationBody`` signed the Standard Webhooks way, as the webhook
  forwarder signs (``integrations.webhook``), with ``webhook-id`` = the notification id.

(What each receives is written in ``integrations.channel_formats``.)

Exactly once, as far as a receiver can tell. A notification's id derives from the org, the rule and
the source event's sequence (``core.domain.notifications.notification_id``), so it is the same on every
attempt. Before sending, the notifier reads the notification's own subject
(``cp.<org>.notification.<id>``): if it holds ``NotificationSent`` (or ``NotificationDeadLettered``),
nothing is sent again. After the channel took the message it appends ``NotificationSent`` with the id
as its command id (``Nats-Msg-Id`` ``<id>:0``; a second record is refused), and only then is the source
event acknowledged. So a notifier killed after recording and before acknowledging sends nothing when
the event comes back. A notifier killed after the channel took the message and before the record is
appended sends it again when the event comes back (after the subscription's ``ack_wait``): delivery
is at least once, with the same id, and receivers deduplicate on the ``webhook-id`` or the
``Message-ID``. Slack does not deduplicate: a Slack channel can show such a message twice.

Failures: a channel that is unavailable (a 5xx, 408 or 429, a timeout, no connection, an SMTP 4xx) is
retried with the subscription's doubling delays; a refusal (another 4xx, an SMTP 5xx, a failed SMTP
login) is not. Either way, once the notification cannot be sent (refused, or the subscription's
``max_deliveries``-th attempt failed) the notifier records ``NotificationDeadLettered`` and the source
event goes to ``cpdlq.<org>.<name>`` with the reason. Other rules of the same event are sent (or
skipped, when recorded) independently of a failing one.

What it follows: an org without a rule sends it none of its task events; the first rule widens its
consumer to them from the event after that rule (``Notifier.start`` and the comment above it; ADR 0010).

The notifier reads the log by direct get and appends to it: it runs with the control plane's NATS
login, like the projector, not as a confined integration (docs/adr/0010-notifications.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import httpx
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerInfo, DeliverPolicy
from standardwebhooks import Webhook

from core.domain.commands import Actor, RecordNotification
from core.domain.events import ChannelKind, SealedText, TaskSubmitted
from core.domain.notification_messages import Happening, compose, happening, matching_rules
from core.domain.notifications import (
    NOTIFICATION_AGGREGATE,
    NOTIFICATIONS,
    NOTIFICATIONS_AGGREGATE,
    NOTIFICATIONS_ID,
    AlreadyRecorded,
    Channel,
    Rule,
    notification_id,
    sealing_purpose,
    webhook_secret,
)
from core.domain.records import RecordedEvent
from core.domain.subjects import aggregate_subject, org_events_filter
from core.domain.task import TaskState
from core.domain.task_decider import TASK
from core.log.handler import CommandHandler
from core.log.nats_version import parse_version
from core.log.store import JetStreamEventStore
from core.secret_box import SecretBox, SecretUnreadable
from integrations.channel_formats import email_message, message_id, slack_body, webhook_body
from integrations.consumer import DeadLetter, Delivery, EventSubscription, filter_subjects_of
from integrations.webhook import ReceiverUnavailable, post, signed_headers

log = logging.getLogger(__name__)

TRIGGER_EVENTS = frozenset(
    {
        "TaskSubmitted",
        "ApprovalRequested",
        "ApprovalEscalated",
        "ApprovalTimedOut",
        "TaskFailed",
        "WorkflowNonDeterministic",
    }
)
"""The event types that may mean something to people: the subscription's type filter."""
TRIGGER_AGGREGATE = "task"
"""Every trigger is an event of a task: the subscription's subject filter, so nothing else is even sent."""
SETTINGS_EVENTS = frozenset(
    {"NotificationChannelDefined", "NotificationChannelDeleted", "NotificationRuleDefined", "NotificationRuleDeleted"}
)
"""What changes an org's channels and rules: followed so the notifier learns when the first rule comes."""
FOLLOW_NARROWLY_SINCE = (2, 14, 0)
"""The consumer reset API (nats-server 2.14) lets the notifier leave an org's task events alone until
the org has a rule; on an older server it follows them always."""
NOTIFIER = Actor(id="system:notifier", roles=frozenset({"admin"}))
TRIGGER_HEADER = "X-CP-Notification-Trigger"


# --- the notifier ---------------------------------------------------------------------------------


class ChannelUnavailable(Exception):
    """A channel did not take a message this time: retry the event later."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def notifier_subscription(nc: NATS, org: str, name: str = "notify", **options: Any) -> EventSubscription:
    """The durable subscription a ``Notifier`` for ``org`` runs on (``options`` as ``EventSubscription``
    takes them: retries, ``ack_wait``, ``start_from``); the notifier chooses what it follows."""
    subjects = (aggregate_subject(org, NOTIFICATIONS_AGGREGATE, NOTIFICATIONS_ID),)
    return EventSubscription(nc, org, name, types=TRIGGER_EVENTS | SETTINGS_EVENTS, subjects=subjects, **options)


class Notifier:
    """Sends the org's notifications for the events of ``subscription`` (see the module docstring). The
    caller owns ``http`` (its timeout bounds each POST) and gives ``smtp_timeout`` for each e-mail; keep
    both below the subscription's ``ack_wait``."""

    def __init__(
        self,
        subscription: EventSubscription,
        store: JetStreamEventStore,
        handler: CommandHandler,
        *,
        console_url: str,
        http: httpx.AsyncClient,
        box: SecretBox,
        smtp_timeout: float = 10.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """``box`` holds the gateway's master key (``CP_SECRETS_KEY``): channels' URLs and secrets are
        sealed with it on the log, and opened here only to send."""
        self.subscription = subscription
        self._box = box
        self.org = subscription.org
        self._store = store
        self._handler = handler
        self._console_url = console_url
        self._http = http
        self._smtp_timeout = smtp_timeout
        self._clock = clock

        self._settings_subject = aggregate_subject(self.org, NOTIFICATIONS_AGGREGATE, NOTIFICATIONS_ID)
        self._triggers = org_events_filter(self.org, TRIGGER_AGGREGATE)
        self._narrow = (self._settings_subject,)
        self._wide = (self._settings_subject, self._triggers)
        version = parse_version(str(store.nc.connected_server_version))
        self._can_narrow = version >= FOLLOW_NARROWLY_SINCE
        self._started = False

    # --- what the consumer follows ------------------------------------------------------------------
    #
    # An org without a rule needs none of its task events: the consumer then follows only the org's
    # channels and rules (cp.<org>.notifications.all), and the server sends the notifier nothing else.
    # The first rule (seen in stream order, like every event) widens it to the task events and moves it
    # back to the event after that rule, so no task event after it is missed; the notifier then reads
    # the rules afresh for each trigger, as before. It narrows again only at a start with nothing in
    # flight (a retry pending on a task event must not be dropped), when the org had no rule at the
    # consumer's last acknowledged event.

    async def start(self) -> None:
        """Set up the consumer as the org's rules call for, then bind to it."""
        self._started = True
        existing = await self.subscription.consumer_info()
        if existing is None:
            first = 1 if self.subscription.start_from == "beginning" else await self._store.last_seq() + 1
            ruled = await self._rules_began(first - 1) is not None
            self.subscription.filter_subjects = self._wide if ruled or not self._can_narrow else self._narrow
            await self.subscription.start(from_seq=first)
            return
        position = existing.ack_floor.stream_seq
        was_wide = self._triggers in filter_subjects_of(existing)
        ruled = await self._rules_began(position) is not None
        if not self._movable(existing) or ruled or (was_wide and existing.num_ack_pending):
            self.subscription.filter_subjects = self._wide
            await self.subscription.start()
            if self._movable(existing) and ruled and not was_wide:
                await self._follow_tasks_from(position + 1, existing)
            return
        self.subscription.filter_subjects = self._narrow
        await self.subscription.start()

    async def _settings_changed(self, seq: int) -> None:
        """The org's channels or rules changed at ``seq``: follow its task events if it now has a rule."""
        began = await self._rules_began(seq)
        if began is None:
            return
        info = await self.subscription.consumer_info()
        if info is None or not self._movable(info) or self._triggers in filter_subjects_of(info):
            return  # following them already (widened by another instance of this notifier, or before a restart)
        await self._follow_tasks_from(began + 1, info)
        log.info("%s: the org has a rule since event %d; following its task events", self.subscription.consumer, began)

    def _movable(self, info: ConsumerInfo) -> bool:
        """Whether the consumer can be moved back to an event (see ``EventSubscription.follow``): one created
        by an older release starts at "new" events and follows every task event for good."""
        starts = info.config.deliver_policy in (DeliverPolicy.ALL, DeliverPolicy.BY_START_SEQUENCE)
        return self._can_narrow and starts

    async def _follow_tasks_from(self, seq: int, info: ConsumerInfo) -> None:
        await self.subscription.follow(self._wide, from_seq=max(seq, info.config.opt_start_seq or 1))

    async def _rules_began(self, seq: int) -> int | None:
        """The event at or before ``seq`` since which the org has had at least one rule; None if it had
        none at ``seq``."""
        state, began = NOTIFICATIONS.initial, None
        for item in await self._store.read_subject(self._settings_subject):
            if item.seq > seq:
                break
            had = bool(state.rules)
            state = NOTIFICATIONS.evolve(state, item.event)
            began = None if not state.rules else (began if had else item.seq)
        return began

    # --- notifying ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Notify until ``stop()``; starts first unless ``start`` was awaited already."""
        if not self._started:
            await self.start()
        await self.subscription.run(self.handle)

    def stop(self) -> None:
        self.subscription.stop()

    async def handle(self, delivery: Delivery) -> None:
        """Send every notification ``delivery`` calls for that the log does not hold yet."""
        if delivery.subject == self._settings_subject:
            await self._settings_changed(delivery.seq)
            return
        settings, _ = await self._handler.load(self.org, NOTIFICATIONS_AGGREGATE, NOTIFICATIONS_ID)
        if not settings.rules:
            return  # an org that asked for no notification: its events need no reading of their tasks
        what = await self._happening(delivery.recorded)
        if what is None:
            return
        retry: list[str] = []
        refused: list[str] = []
        for rule in matching_rules(settings, what):
            notification = notification_id(self.org, rule.id, delivery.seq)
            recorded, _ = await self._handler.load(self.org, NOTIFICATION_AGGREGATE, notification)
            if recorded is not None:
                continue  # sent (or given up) by an earlier delivery of this event
            channel = settings.channels[rule.channel]
            try:
                sent_as = await self._send(notification, rule, channel, delivery.recorded, what)
            except ChannelUnavailable as exc:
                if delivery.delivery_count < self.subscription.max_deliveries:
                    retry.append(f"rule {rule.id}: {exc}")
                    continue
                error = (
                    f"rule {rule.id}: {exc} (attempt {delivery.delivery_count} of {self.subscription.max_deliveries})"
                )
            except DeadLetter as exc:
                error = f"rule {rule.id}: {exc}"
            else:
                await self._record(notification, rule, channel, delivery, what, message_id=sent_as)
                continue
            await self._record(notification, rule, channel, delivery, what, error=error)
            refused.append(error)
        if retry:
            raise ChannelUnavailable("; ".join(retry))
        if refused:
            raise DeadLetter("; ".join(refused))

    async def _happening(self, source: RecordedEvent) -> Happening | None:
        """What the event did to its task, from the task's history up to it (event by event: a command's
        later events must not hide what an earlier one did)."""
        if type(source.event).__struct_config__.tag not in TRIGGER_EVENTS:
            return None
        before: TaskState = None
        if isinstance(source.event, TaskSubmitted):  # the task's first event: nothing to read
            return happening(source.event, None, TASK.evolve(None, source.event))
        for item in await self._store.read_subject(source.subject):
            if item.seq >= source.seq:
                break
            before = TASK.evolve(before, item.event)
        return happening(source.event, before, TASK.evolve(before, source.event))

    async def _send(
        self, notification: str, rule: Rule, channel: Channel, source: RecordedEvent, what: Happening
    ) -> str:
        """Hand the message to the channel; returns the id the receiver knows it by."""
        msg = compose(self.org, what, self._console_url)
        match channel.kind:
            case "email":
                await self._send_email(channel, email_message(self.org, notification, channel, msg, self._clock()))
                return message_id(notification)
            case "slack":
                await self._post(channel, slack_body(msg), {"Content-Type": "application/json"})
            case "webhook":
                secret = self._credential(channel, "secret", channel.secret)
                assert secret is not None
                body = webhook_body(self.org, notification, rule, source, what, msg)
                signer = Webhook(webhook_secret(secret))
                headers = {**signed_headers(signer, notification, self._clock(), body), TRIGGER_HEADER: what.trigger}
                await self._post(channel, body, headers)
        return notification

    async def _post(self, channel: Channel, body: bytes, headers: dict[str, str]) -> None:
        url = self._credential(channel, "url", channel.url)
        assert url is not None
        try:
            await post(self._http, url, body, headers)
        except ReceiverUnavailable as exc:
            raise ChannelUnavailable(f"channel {channel.name}: {exc}") from exc
        except DeadLetter as exc:
            raise DeadLetter(f"channel {channel.name}: {exc}") from exc

    def _credential(self, channel: Channel, field: str, sealed: SealedText | None) -> str | None:
        """A channel's URL or secret, opened with the master key; a key that cannot open it (another
        gateway's key, or an altered ciphertext) dead-letters the notification, saying so."""
        if sealed is None:
            return None
        try:
            return self._box.open_text(self.org, sealing_purpose(channel.name, field), sealed)
        except SecretUnreadable as exc:
            raise DeadLetter(f"channel {channel.name}: its {field} does not open here: {exc}") from exc

    async def _send_email(self, channel: Channel, email: EmailMessage) -> None:
        smtp = channel.smtp
        assert smtp is not None
        where = f"channel {channel.name}: SMTP server {smtp.host}:{smtp.port}"
        try:
            _, answer = await aiosmtplib.send(
                email,
                hostname=smtp.host,
                port=smtp.port,
                start_tls=smtp.starttls,
                username=smtp.username,
                password=self._credential(channel, "secret", channel.secret) if smtp.username is not None else None,
                timeout=self._smtp_timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refusal.code for refusal in exc.recipients]
            text = f"{where} refused every recipient ({', '.join(map(str, codes))})"
            if any(400 <= code < 500 for code in codes):
                raise ChannelUnavailable(text) from exc
            raise DeadLetter(text) from exc
        except aiosmtplib.SMTPResponseException as exc:
            text = f"{where} answered {exc.code} {exc.message}"
            if 400 <= exc.code < 500:
                raise ChannelUnavailable(text) from exc
            raise DeadLetter(text) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            raise DeadLetter(f"{where}: {exc}") from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise ChannelUnavailable(f"{where}: {exc!r}") from exc
        log.debug("%s took the message: %s", where, answer)

    async def _record(
        self,
        notification: str,
        rule: Rule,
        channel: Channel,
        delivery: Delivery,
        what: Happening,
        *,
        message_id: str = "",
        error: str = "",
    ) -> None:
        kind: ChannelKind = channel.kind
        command = RecordNotification(
            notification_id=notification,
            outcome="dead_lettered" if error else "sent",
            rule_id=rule.id,
            channel=channel.name,
            kind=kind,
            trigger=what.trigger,
            source_seq=delivery.seq,
            source_type=str(type(delivery.event).__struct_config__.tag),
            task_id=what.task.id,
            approval_id=None if what.approval is None else what.approval.id,
            message_id=message_id,
            deliveries=delivery.delivery_count,
            error=error[:1000],
        )
        # Another notifier may have recorded it first: the log holds one record either way.
        with contextlib.suppress(AlreadyRecorded):
            await self._handler.handle(self.org, command, actor=NOTIFIER, command_id=notification)
        if error:
            log.warning("%s: notification %s not sent: %s", self.subscription.consumer, notification, error)
        else:
            log.info(
                "%s: %s sent to %s (%s) for event %d",
                self.subscription.consumer,
                what.trigger,
                channel.name,
                channel.kind,
                delivery.seq,
            )
