"""Notifications to people: an org's channels and rules, and what became of each notification.

Two aggregates:

* ``cp.<org>.notifications.all``: the org's channels (a Slack-compatible incoming webhook, e-mail over
  SMTP, a Standard Webhooks endpoint) and its rules (which happenings, filtered by queue, environment
  and workflow, go to which channel). One aggregate, because a rule names a channel that must exist and a
  channel that rules use may not be deleted: a rule across both.
* ``cp.<org>.notification.<notification id>``: one per (rule, source event), holding
  ``NotificationSent`` or ``NotificationDeadLettered``. Its id derives from the org, the rule and the
  source event's sequence, so the notifier (``integrations/notify.py``) can ask the log whether a
  notification was already sent before it sends, and a second record is refused.

Both pure: no I/O, no clock. What a notification says, and which rules send it, is
``core.domain.notification_messages``'."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from core.domain.commands import (
    Command,
    DefineNotificationChannel,
    DefineNotificationRule,
    DeleteNotificationChannel,
    DeleteNotificationRule,
    RecordNotification,
    RewrapNotificationChannel,
)
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.errors import AlreadyExists, InvalidCommand, NotFound, Rejected
from core.domain.events import (
    ChannelKind,
    Event,
    NotificationChannelDefined,
    NotificationChannelDeleted,
    NotificationChannelRewrapped,
    NotificationDeadLettered,
    NotificationRuleDefined,
    NotificationRuleDeleted,
    NotificationSent,
    NotificationTrigger,
    SealedText,
    SmtpSettings,
)

NOTIFICATIONS_AGGREGATE = "notifications"
NOTIFICATIONS_ID = "all"
NOTIFICATION_AGGREGATE = "notification"
MAX_CHANNELS = 50
MAX_RULES = 200
"""Per org: channels and rules are one aggregate, read for every event the notifier handles."""

SECRET_PREFIX = "whsec_"


def webhook_secret(text: str) -> bytes:
    """The signing key of a configured Standard Webhooks secret: ``whsec_<base64>`` decoded, any other
    text as its UTF-8 bytes. Raises ``ValueError`` saying what is wrong."""
    if text.startswith(SECRET_PREFIX):
        encoded = text[len(SECRET_PREFIX) :]
        try:
            secret = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"invalid webhook secret: after {SECRET_PREFIX} comes base64") from None
        if not secret:
            raise ValueError(f"invalid webhook secret: {SECRET_PREFIX} with nothing after it")
        return secret
    if not text:
        raise ValueError(f"the webhook secret is empty: give {SECRET_PREFIX}<base64> or any other text")
    return text.encode()


# --- channels and rules ---------------------------------------------------------------------------


class Channel(msgspec.Struct, frozen=True):
    name: str
    kind: ChannelKind
    url: SealedText | None
    """Sealed: only a holder of the master key opens it (the notifier, to send)."""
    endpoint: str | None
    """Where the channel posts, shown instead of ``url``."""
    smtp: SmtpSettings | None
    secret: SealedText | None
    created_at: datetime
    updated_at: datetime
    defined_by: str


class Rule(msgspec.Struct, frozen=True):
    id: str
    channel: str
    on: tuple[NotificationTrigger, ...]
    queue: str | None
    environment: str | None
    workflow: str | None
    created_at: datetime
    defined_by: str


class NotificationSettings(msgspec.Struct, frozen=True):
    """The org's channels by name and rules by id."""

    channels: dict[str, Channel] = {}
    rules: dict[str, Rule] = {}

    def listed_channels(self) -> list[Channel]:
        return [self.channels[name] for name in sorted(self.channels)]

    def listed_rules(self) -> list[Rule]:
        return [self.rules[rule_id] for rule_id in sorted(self.rules)]

    def rules_using(self, channel: str) -> list[str]:
        return sorted(rule.id for rule in self.rules.values() if rule.channel == channel)


class ChannelInUse(Rejected):
    """Rules send to the channel: it may not go while they do."""


class TooMany(Rejected):
    pass


class ChannelRedefined(Rejected):
    """The channel a re-wrap read was deleted or defined again since: its re-wrapped values are stale."""


def check_channel_url(url: str) -> str:
    """An http(s) URL with a host; raises ``ValueError`` naming what is wrong."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # the port is checked when read
    except ValueError as exc:
        raise ValueError(f"invalid channel URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("invalid channel URL: expected http(s)://host[:port]/path")
    return url


def sealing_purpose(channel: str, field: str) -> str:
    """What a channel's sealed ``url`` or ``secret`` opens for (with the org): that channel's field only."""
    return f"notification-channel/{channel}/{field}"


def endpoint(url: str) -> str:
    """Where a channel posts, without what may be secret in its URL: the path (a Slack webhook's token),
    the query and any login."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/…"


def _check_channel(command: DefineNotificationChannel) -> None:
    """What each kind needs, and nothing it would silently ignore."""
    if (command.url is None) != (command.sealed_url is None) or (command.secret is None) != (
        command.sealed_secret is None
    ):
        raise InvalidCommand("a channel's url and secret reach the log only sealed: seal them with the master key")
    if command.kind in ("slack", "webhook"):
        if command.url is None:
            raise InvalidCommand(f"a {command.kind} channel needs url, the receiver's http(s) URL")
        if command.smtp is not None:
            raise InvalidCommand(f"a {command.kind} channel takes no smtp settings; kind email does")
        try:
            check_channel_url(command.url)
        except ValueError as exc:
            raise InvalidCommand(str(exc)) from None
    if command.kind == "slack" and command.secret is not None:
        raise InvalidCommand("a slack channel takes no secret: its URL is its credential")
    if command.kind == "webhook":
        if command.secret is None:
            raise InvalidCommand(
                f"a webhook channel needs secret, the Standard Webhooks signing secret ({SECRET_PREFIX}<base64>, "
                "or any other text), so receivers can tell our deliveries from forgeries"
            )
        try:
            webhook_secret(command.secret)
        except ValueError as exc:
            raise InvalidCommand(str(exc)) from None
    if command.kind == "email":
        if command.smtp is None:
            raise InvalidCommand("an email channel needs smtp: {host, port, starttls, username?, from, to: [...]}")
        if command.url is not None:
            raise InvalidCommand("an email channel takes no url; it sends through its smtp server")
        if command.secret is not None and command.smtp.username is None:
            raise InvalidCommand("the secret of an email channel is the SMTP password: give smtp.username with it")


def _decide_settings(state: NotificationSettings, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    match command:
        case DefineNotificationChannel():
            existing = state.channels.get(command.name)
            if existing is not None and not command.replace:
                raise AlreadyExists(f"notification channel {command.name} already exists; replace it to change it")
            if existing is None and len(state.channels) >= MAX_CHANNELS:
                raise TooMany(f"this org has {MAX_CHANNELS} notification channels, the most it may have")
            _check_channel(command)
            smtp = None
            if command.smtp is not None:
                spec = command.smtp
                smtp = SmtpSettings(
                    host=spec.host,
                    port=spec.port,
                    starttls=spec.starttls,
                    username=spec.username,
                    sender=spec.sender,
                    recipients=tuple(dict.fromkeys(spec.recipients)),
                )
            return [
                NotificationChannelDefined(
                    at=ctx.now,
                    name=command.name,
                    kind=command.kind,
                    url=command.sealed_url,
                    endpoint=None if command.url is None else endpoint(command.url),
                    smtp=smtp,
                    secret=command.sealed_secret,
                    defined_by=ctx.actor.id,
                )
            ]
        case RewrapNotificationChannel():
            current = state.channels.get(command.name)
            if current is None or current.updated_at != command.defined_at:
                raise ChannelRedefined(
                    f"notification channel {command.name} was deleted or defined again since it was read; "
                    "read it again to re-wrap it"
                )
            return [
                NotificationChannelRewrapped(
                    at=ctx.now,
                    name=command.name,
                    defined_at=command.defined_at,
                    url=command.url,
                    secret=command.secret,
                    by=ctx.actor.id,
                )
            ]
        case DeleteNotificationChannel():
            if command.name not in state.channels:
                raise NotFound(f"notification channel {command.name} not found")
            if users := state.rules_using(command.name):
                raise ChannelInUse(
                    f"notification channel {command.name} is used by rule(s) {', '.join(users)}; delete them first"
                )
            return [NotificationChannelDeleted(at=ctx.now, name=command.name, deleted_by=ctx.actor.id)]
        case DefineNotificationRule():
            if command.rule_id in state.rules:
                raise AlreadyExists(f"notification rule {command.rule_id} already exists; delete it first")
            if len(state.rules) >= MAX_RULES:
                raise TooMany(f"this org has {MAX_RULES} notification rules, the most it may have")
            if command.channel not in state.channels:
                raise InvalidCommand(
                    f"notification channel {command.channel} is not defined; create it with "
                    "POST /v1/notification-channels first"
                )
            if len(set(command.on)) != len(command.on):
                raise InvalidCommand("a trigger is listed twice in on; list each once")
            return [
                NotificationRuleDefined(
                    at=ctx.now,
                    rule_id=command.rule_id,
                    channel=command.channel,
                    on=command.on,
                    queue=command.queue,
                    environment=command.environment,
                    workflow=command.workflow,
                    defined_by=ctx.actor.id,
                )
            ]
        case DeleteNotificationRule():
            if command.rule_id not in state.rules:
                raise NotFound(f"notification rule {command.rule_id} not found")
            return [NotificationRuleDeleted(at=ctx.now, rule_id=command.rule_id, deleted_by=ctx.actor.id)]
    raise TypeError(f"notifications aggregate does not handle {type(command).__name__}")


def _evolve_settings(state: NotificationSettings, event: Event) -> NotificationSettings:
    match event:
        case NotificationChannelDefined():
            before = state.channels.get(event.name)
            channel = Channel(
                name=event.name,
                kind=event.kind,
                url=event.url,
                endpoint=event.endpoint,
                smtp=event.smtp,
                secret=event.secret,
                created_at=event.at if before is None else before.created_at,
                updated_at=event.at,
                defined_by=event.defined_by,
            )
            return msgspec.structs.replace(state, channels={**state.channels, event.name: channel})
        case NotificationChannelRewrapped():
            current = state.channels.get(event.name)
            if current is None or current.updated_at != event.defined_at:
                return state
            rewrapped = msgspec.structs.replace(current, url=event.url, secret=event.secret)
            return msgspec.structs.replace(state, channels={**state.channels, event.name: rewrapped})
        case NotificationChannelDeleted() if event.name in state.channels:
            kept = {name: channel for name, channel in state.channels.items() if name != event.name}
            return msgspec.structs.replace(state, channels=kept)
        case NotificationRuleDefined():
            rule = Rule(
                id=event.rule_id,
                channel=event.channel,
                on=event.on,
                queue=event.queue,
                environment=event.environment,
                workflow=event.workflow,
                created_at=event.at,
                defined_by=event.defined_by,
            )
            return msgspec.structs.replace(state, rules={**state.rules, event.rule_id: rule})
        case NotificationRuleDeleted() if event.rule_id in state.rules:
            kept_rules = {rule_id: rule for rule_id, rule in state.rules.items() if rule_id != event.rule_id}
            return msgspec.structs.replace(state, rules=kept_rules)
    return state


NOTIFICATIONS = Decider[NotificationSettings](
    aggregate=NOTIFICATIONS_AGGREGATE,
    commands=(
        DefineNotificationChannel,
        RewrapNotificationChannel,
        DeleteNotificationChannel,
        DefineNotificationRule,
        DeleteNotificationRule,
    ),
    initial=NotificationSettings(),
    decide=_decide_settings,
    evolve=_evolve_settings,
    timers=no_timers,
    aggregate_id=lambda command: NOTIFICATIONS_ID,
)


# --- one notification -------------------------------------------------------------------------------

NotificationRecord = NotificationSent | NotificationDeadLettered


class AlreadyRecorded(Rejected):
    """The notification was sent or dead-lettered already: nothing more to record."""


def _decide_record(state: NotificationRecord | None, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    if not isinstance(command, RecordNotification):
        raise TypeError(f"notification aggregate does not handle {type(command).__name__}")
    if state is not None:
        raise AlreadyRecorded(f"notification {command.notification_id} was recorded already ({type(state).__name__})")
    common: dict[str, Any] = {
        "at": ctx.now,
        "notification_id": command.notification_id,
        "rule_id": command.rule_id,
        "channel": command.channel,
        "kind": command.kind,
        "trigger": command.trigger,
        "source_seq": command.source_seq,
        "source_type": command.source_type,
        "task_id": command.task_id,
        "approval_id": command.approval_id,
    }
    if command.outcome == "sent":
        return [NotificationSent(**common, message_id=command.message_id)]
    return [NotificationDeadLettered(**common, deliveries=command.deliveries, error=command.error)]


def _evolve_record(state: NotificationRecord | None, event: Event) -> NotificationRecord | None:
    if state is None and isinstance(event, NotificationSent | NotificationDeadLettered):
        return event
    return state


NOTIFICATION = Decider[NotificationRecord | None](
    aggregate=NOTIFICATION_AGGREGATE,
    commands=(RecordNotification,),
    initial=None,
    decide=_decide_record,
    evolve=_evolve_record,
    timers=no_timers,
    aggregate_id=lambda command: command.notification_id,  # type: ignore[attr-defined]
)


def notification_id(org: str, rule_id: str, source_seq: int) -> str:
    """The id of the notification rule ``rule_id`` sends about the event at ``source_seq``: the same on
    every attempt, so it names the log's record and the message's id at the receiver."""
    return hashlib.sha256(f"{org}\x1f{rule_id}\x1f{source_seq}".encode()).hexdigest()[:40]
