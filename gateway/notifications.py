"""Notification channels and rules (admin only): ``/v1/notification-channels`` and
``/v1/notification-rules``.

They are one aggregate per org on the log (``core/domain/notifications.py``), read from the log at every
request, so every read shows every write before it. The notifier (``controlplane notify``) follows the
same aggregate. A channel's URL and secret reach the log sealed by the gateway's master key
(``CP_SECRETS_KEY``; without it, defining a channel answers 503) and never come back: a channel's
document shows only its URL's scheme and host (a Slack incoming webhook's URL is its credential) and
whether it has a secret."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from application.bodies import NotificationChannelBody, NotificationChannelReplaceBody, NotificationRuleBody
from application.idempotency import derived_id
from application.principal import Principal
from core.domain.commands import (
    DefineNotificationChannel,
    DefineNotificationRule,
    DeleteNotificationChannel,
    DeleteNotificationRule,
)
from core.domain.errors import AlreadyExists
from core.domain.events import SealedText
from core.domain.ids import InvalidToken, new_id, validate_token
from core.domain.notifications import (
    NOTIFICATIONS_AGGREGATE,
    NOTIFICATIONS_ID,
    Channel,
    NotificationSettings,
    Rule,
    sealing_purpose,
)
from core.secret_box import SecretBox
from gateway.http import body, handled, idempotency_key, json, path_id, principal, services
from gateway.problems import Problem
from gateway.secrets import required_box

PERMISSION = "admin"


def channel_document(channel: Channel, seq: int) -> dict[str, Any]:
    return {
        "name": channel.name,
        "kind": channel.kind,
        "endpoint": channel.endpoint,
        "smtp": None if channel.smtp is None else msgspec.to_builtins(channel.smtp),
        "secret_set": channel.secret is not None,
        "created_at": channel.created_at,
        "updated_at": channel.updated_at,
        "defined_by": channel.defined_by,
        "seq": seq,
    }


def rule_document(rule: Rule, seq: int) -> dict[str, Any]:
    return {
        "id": rule.id,
        "channel": rule.channel,
        "on": list(rule.on),
        "queue": rule.queue,
        "environment": rule.environment,
        "workflow": rule.workflow,
        "created_at": rule.created_at,
        "defined_by": rule.defined_by,
        "seq": seq,
    }


async def _settings(request: Request, who: Principal) -> tuple[NotificationSettings, int]:
    settings, seq = await services(request).handler.load(who.org, NOTIFICATIONS_AGGREGATE, NOTIFICATIONS_ID)
    return settings, seq


def _fingerprint(box: SecretBox, spec: msgspec.Struct) -> str:
    """Keyed: the command id in the log must reveal nothing of the URL or secret it was derived from."""
    return box.fingerprint(msgspec.json.encode(spec).decode())


def _define_channel(
    box: SecretBox, org: str, name: str, spec: NotificationChannelReplaceBody, *, replace: bool
) -> DefineNotificationChannel:
    def sealed(field: str, value: str | None) -> SealedText | None:
        return None if value is None else box.seal_text(org, sealing_purpose(name, field), value)

    return DefineNotificationChannel(
        name=name,
        kind=spec.kind,
        url=spec.url,
        smtp=spec.smtp,
        secret=spec.secret,
        replace=replace,
        sealed_url=sealed("url", spec.url),
        sealed_secret=sealed("secret", spec.secret),
    )


async def create_channel(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    spec = await body(request, NotificationChannelBody)
    box = required_box(services(request))
    try:
        command = _define_channel(box, who.org, spec.name, spec, replace=False)
        outcome = await handled(request, who, command, "notification-channel", _fingerprint(box, spec))
    except AlreadyExists as exc:
        raise Problem(
            409,
            f"notification channel {spec.name} already exists; replace it with "
            f"PUT /v1/notification-channels/{spec.name}, or delete it first",
        ) from exc
    return json(channel_document(outcome.state.channels[spec.name], outcome.seq), 201)


async def replace_channel(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    name = request.path_params["name"]
    try:
        validate_token(name, "notification channel name")
    except InvalidToken as exc:
        raise Problem(422, str(exc)) from exc
    spec = await body(request, NotificationChannelReplaceBody)
    box = required_box(services(request))
    command = _define_channel(box, who.org, name, spec, replace=True)
    outcome = await handled(request, who, command, "notification-channel", name, _fingerprint(box, spec))
    return json(channel_document(outcome.state.channels[name], outcome.seq))


async def list_channels(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    settings, seq = await _settings(request, who)
    return json({"items": [channel_document(c, seq) for c in settings.listed_channels()], "seq": seq})


async def get_channel(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    name = path_id(request, "name", "notification channel")
    settings, seq = await _settings(request, who)
    channel = settings.channels.get(name)
    if channel is None:
        raise Problem(404, f"notification channel {name} not found")
    return json(channel_document(channel, seq))


async def delete_channel(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    name = path_id(request, "name", "notification channel")
    await handled(request, who, DeleteNotificationChannel(name=name), "notification-channel-delete", name)
    return Response(status_code=204)


async def create_rule(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    spec = await body(request, NotificationRuleBody)
    key = idempotency_key(request)
    rule_id = spec.id or (new_id() if key is None else derived_id(who.org, who.credential_id, key, "rule")[:32])
    command = DefineNotificationRule(
        rule_id=rule_id,
        channel=spec.channel,
        on=spec.on,
        queue=spec.queue,
        environment=spec.environment,
        workflow=spec.workflow,
    )
    try:
        fingerprint = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()
        outcome = await handled(request, who, command, "notification-rule", fingerprint)
    except AlreadyExists as exc:
        raise Problem(
            409,
            f"notification rule {rule_id} already exists (or this Idempotency-Key was used with another body); "
            f"delete it first with DELETE /v1/notification-rules/{rule_id}",
        ) from exc
    return json(rule_document(outcome.state.rules[rule_id], outcome.seq), 201)


async def list_rules(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    settings, seq = await _settings(request, who)
    return json({"items": [rule_document(rule, seq) for rule in settings.listed_rules()], "seq": seq})


async def delete_rule(request: Request) -> Response:
    who = await principal(request, PERMISSION)
    rule_id = path_id(request, "rule_id", "notification rule")
    await handled(request, who, DeleteNotificationRule(rule_id=rule_id), "notification-rule-delete", rule_id)
    return Response(status_code=204)
