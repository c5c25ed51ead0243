"""Creating orgs and their first keys, for ``controlplane orgs create`` and the dev stack."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from core.domain.access import ApiKey, issue_key, parse_key
from core.domain.commands import SYSTEM, CreateApiKey, CreateOrg
from core.domain.errors import AlreadyExists
from core.log.handler import CommandHandler


async def seed_org(
    handler: CommandHandler, org: str, roles: Iterable[str], known_keys: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Make sure ``org`` exists with one key per role; returns role -> key. Keys in ``known_keys`` that
    the log still holds (and has not revoked) are kept, so a restarted dev stack keeps its keys."""
    with contextlib.suppress(AlreadyExists):
        await handler.handle(org, CreateOrg(org=org, name=org), actor=SYSTEM)
    keys: dict[str, str] = {}
    for role in roles:
        known = (known_keys or {}).get(role)
        if known is not None and await _still_valid(handler, org, known):
            keys[role] = known
            continue
        issued = issue_key()
        await handler.handle(
            org,
            CreateApiKey(key_id=issued.key_id, name=f"{role} key", roles=(role,), secret_sha256=issued.secret_sha256),
            actor=SYSTEM,
        )
        keys[role] = issued.key
    return keys


async def _still_valid(handler: CommandHandler, org: str, key: str) -> bool:
    parsed = parse_key(key)
    if parsed is None:
        return False
    state, _ = await handler.load(org, "apikey", parsed[0])
    return isinstance(state, ApiKey) and state.revoked_at is None and state.secret_sha256 == parsed[1]
