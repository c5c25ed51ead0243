"""``POST /v1/secrets/rewrap``: after a master key rotation (``core/secret_box.py``), everything of the
org still sealed by a previous key is wrapped again by the current one: each secret version's data key
(``RewrapSecret``) and each notification channel's sealed URL and secret (``RewrapNotificationChannel``).
Values never leave the gateway's memory and the ciphertexts stay as they are; the answer says what was
re-wrapped and what could not be opened (sealed by a key this gateway does not hold, or altered). Sent
again, it re-wraps what is left: once it lists nothing, the previous key can be retired."""

from __future__ import annotations

import contextlib
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from application.idempotency import derived_id
from application.principal import Principal
from core.domain.commands import RewrapNotificationChannel, RewrapSecret
from core.domain.notifications import (
    NOTIFICATIONS_AGGREGATE,
    NOTIFICATIONS_ID,
    ChannelRedefined,
    sealing_purpose,
)
from core.domain.secrets import SECRETS_AGGREGATE, SECRETS_ID, AlreadyRewrapped
from core.secret_box import Sealed, SecretBox, SecretUnreadable
from gateway.http import json, principal, services
from gateway.secrets import required_box
from gateway.services import Services

Listed = list[dict[str, Any]]


async def rewrap(request: Request) -> Response:
    who = await principal(request, "admin")
    svc = services(request)
    box = required_box(svc)
    rewrapped, unreadable = await _secret_versions(svc, who, box)
    channels, stuck_channels = await _channels(svc, who, box)
    return json(
        {
            "key_id": box.key_id,
            "rewrapped": rewrapped,
            "unreadable": unreadable,
            "channels": {"rewrapped": channels, "unreadable": stuck_channels},
        }
    )


async def _secret_versions(svc: Services, who: Principal, box: SecretBox) -> tuple[Listed, Listed]:
    secrets, _ = await svc.handler.load(who.org, SECRETS_AGGREGATE, SECRETS_ID)
    rewrapped: Listed = []
    unreadable: Listed = []
    for versions in secrets.by_name.values():
        for found in versions:
            if found.key_id == box.key_id:
                continue
            sealed = Sealed(found.key_id, found.wrapped_key, found.nonce, found.ciphertext)
            try:
                moved = box.rewrap(who.org, found.name, found.version, found.environment, sealed)
            except SecretUnreadable as exc:
                unreadable.append({"name": found.name, "version": found.version, "reason": str(exc)})
                continue
            command = RewrapSecret(
                name=found.name,
                version=found.version,
                from_key_id=found.key_id,
                key_id=moved.key_id,
                wrapped_key=moved.wrapped_key,
            )
            with contextlib.suppress(AlreadyRewrapped):  # another gateway's re-wrap came first
                await svc.handler.handle(
                    who.org,
                    command,
                    actor=who.actor,
                    command_id=derived_id(who.org, "secret-rewrap", found.name, str(found.version), box.key_id),
                )
            rewrapped.append({"name": found.name, "version": found.version, "from_key_id": found.key_id})
    return rewrapped, unreadable


async def _channels(svc: Services, who: Principal, box: SecretBox) -> tuple[Listed, Listed]:
    settings, _ = await svc.handler.load(who.org, NOTIFICATIONS_AGGREGATE, NOTIFICATIONS_ID)
    rewrapped: Listed = []
    unreadable: Listed = []
    for channel in settings.channels.values():
        sealed_fields = {"url": channel.url, "secret": channel.secret}
        fields = [name for name, sealed in sealed_fields.items() if sealed is not None and sealed.key_id != box.key_id]
        if not fields:
            continue
        try:
            moved = {
                name: None if sealed is None else box.rewrap_text(who.org, sealing_purpose(channel.name, name), sealed)
                for name, sealed in sealed_fields.items()
            }
        except SecretUnreadable as exc:
            unreadable.append({"name": channel.name, "reason": str(exc)})
            continue
        command = RewrapNotificationChannel(
            name=channel.name, defined_at=channel.updated_at, url=moved["url"], secret=moved["secret"]
        )
        with contextlib.suppress(ChannelRedefined):  # defined again meanwhile: by the current key
            await svc.handler.handle(
                who.org,
                command,
                actor=who.actor,
                command_id=derived_id(
                    who.org, "channel-rewrap", channel.name, channel.updated_at.isoformat(), box.key_id
                ),
            )
        rewrapped.append({"name": channel.name, "fields": fields})
    return rewrapped, unreadable
