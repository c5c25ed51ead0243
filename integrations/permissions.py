"""NATS configuration that confines an integration to its own org's events: pure functions, no I/O.

An org's integrations live in their own account, ``ORG_<org>``, and reach the account that holds the
log (``CP``) only through imports pinned to that org. User permissions alone cannot do this: in one
account, a user allowed to send any request may name any reply subject, and the server publishes the
answer there. Measured on nats-server 2.15: a pull request with reply ``cp.other.task.x`` wrote a
copy of an event into another org's log. Across accounts every reply subject is remapped, so nothing
an integration names can land in ``cp.>`` or ``cpsched.>`` of the log's account.

What the imports allow, for each integration ``name`` of ``org`` (consumer ``<name>@<org>``):

* create or update that consumer, only with filter ``cp.<org>.>``: the filter is part of the create
  subject (``$JS.API.CONSUMER.CREATE.<stream>.<consumer>.<filter>``, nats-server 2.9+) and the server
  refuses a request whose body names another filter (err 10131) or several (10137);
* read its info, fetch from it (``CONSUMER.MSG.NEXT``) and acknowledge its deliveries (``$JS.ACK``);
* publish its dead letters to ``cpdlq.<org>.<name>``.

The JetStream API imports are mapped under ``cpjs.API`` (``CONFINED_JS_API_PREFIX``), because
``$JS.API`` inside the org account answers for that account's own JetStream, which is disabled. The
user's permissions repeat the same list, so anything else is refused with a permissions violation
instead of silently going nowhere, and deny publishing to ``cp.>``, ``cpsched.>`` and ``$JS.API.>``.

Not covered: a create request's body is not visible to permissions, so a confined user can make its
consumer a push consumer delivering its own org's events to some subject of the log's account. The
server refuses deliver subjects inside ``CP_EVENTS`` (err 10081), so the log is safe, but such
deliveries could reach ``cpdlq.<other org>.…`` while someone listens there: dead-letter readers
should trust an entry only if its ``Cp-Dlq-Subject`` header is under their own ``cp.<org>.``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.domain.ids import validate_token
from core.domain.subjects import EVENTS_PREFIX, SCHEDULES_PREFIX, org_events_filter
from core.log.store import STREAM_NAME
from integrations.consumer import (
    CONFINED_JS_API_PREFIX,
    DEAD_LETTER_PREFIX,
    DEAD_LETTER_STREAM,
    DEFAULT_JS_API_PREFIX,
    consumer_name,
    dead_letter_subject,
)

CP_ACCOUNT = "CP"
DEFAULT_INTEGRATION_NAMES = ("webhook",)
ACK_PREFIX = "$JS.ACK"

_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NKEY_USER = re.compile(r"^U[A-Z2-7]{55}$")


def org_account_name(org: str) -> str:
    return f"ORG_{validate_token(org, 'org')}"


def cp_exports() -> list[dict[str, Any]]:
    """Service exports of the account that holds CP_EVENTS: the same for every org, added once. Only
    accounts that import them can use them, and each org account imports only its own consumers."""
    return [
        {"service": f"{DEFAULT_JS_API_PREFIX}.CONSUMER.CREATE.{STREAM_NAME}.>"},
        {"service": f"{DEFAULT_JS_API_PREFIX}.CONSUMER.INFO.{STREAM_NAME}.*"},
        # A fetch is answered by as many messages as the batch asks for.
        {"service": f"{DEFAULT_JS_API_PREFIX}.CONSUMER.MSG.NEXT.{STREAM_NAME}.*", "response": "stream"},
        {"service": f"{ACK_PREFIX}.{STREAM_NAME}.>"},
        {"service": f"{DEAD_LETTER_PREFIX}.>"},
    ]


def _api_subjects(org: str, name: str) -> list[str]:
    """JetStream API subjects for one integration, after the API prefix."""
    consumer = consumer_name(org, name)
    return [
        f"CONSUMER.CREATE.{STREAM_NAME}.{consumer}.{org_events_filter(org)}",
        f"CONSUMER.INFO.{STREAM_NAME}.{consumer}",
        f"CONSUMER.MSG.NEXT.{STREAM_NAME}.{consumer}",
    ]


def _plain_subjects(org: str, name: str) -> list[str]:
    return [f"{ACK_PREFIX}.{STREAM_NAME}.{consumer_name(org, name)}.>", dead_letter_subject(org, name)]


def _names(names: Iterable[str]) -> list[str]:
    checked = [validate_token(name, "integration name") for name in names]
    if not checked:
        raise ValueError("name at least one integration (consumer) for the account")
    return list(dict.fromkeys(checked))


def org_imports(org: str, names: Iterable[str], *, cp_account: str = CP_ACCOUNT) -> list[dict[str, Any]]:
    """The org account's imports: its own consumers on its own events, and their dead-letter subjects."""
    _check_account_name(cp_account)
    imports: list[dict[str, Any]] = []
    for name in _names(names):
        imports += [
            {
                "service": {"account": cp_account, "subject": f"{DEFAULT_JS_API_PREFIX}.{subject}"},
                "to": f"{CONFINED_JS_API_PREFIX}.{subject}",
            }
            for subject in _api_subjects(org, name)
        ]
        imports += [{"service": {"account": cp_account, "subject": subject}} for subject in _plain_subjects(org, name)]
    return imports


def integration_permissions(org: str, names: Iterable[str]) -> dict[str, Any]:
    """What an integration user may publish and subscribe to inside its org account."""
    allowed: list[str] = []
    for name in _names(names):
        allowed += [f"{CONFINED_JS_API_PREFIX}.{subject}" for subject in _api_subjects(org, name)]
        allowed += _plain_subjects(org, name)
    return {
        "publish": {
            "allow": allowed,
            "deny": [f"{EVENTS_PREFIX}.>", f"{SCHEDULES_PREFIX}.>", f"{DEFAULT_JS_API_PREFIX}.>"],
        },
        "subscribe": {"allow": ["_INBOX.>"]},
    }


def integration_user(
    org: str,
    names: Iterable[str] = DEFAULT_INTEGRATION_NAMES,
    *,
    user: str | None = None,
    password: str | None = None,
    nkey: str | None = None,
) -> dict[str, Any]:
    """A user entry of the org account: ``user`` + ``password`` (plain, or a bcrypt hash from
    ``nats server passwd``), or an ``nkey`` (a user public key, ``U…``)."""
    permissions = integration_permissions(org, names)
    if nkey is not None:
        if password is not None or user is not None:
            raise ValueError("an nkey user has neither a user name nor a password: give --nkey alone")
        return {"nkey": _checked_nkey(nkey), "permissions": permissions}
    if password is None:
        raise ValueError("give the integration user a password or an nkey")
    return {
        "user": _config_string(user or default_user(org), "user name"),
        "password": _config_string(password, "password"),
        "permissions": permissions,
    }


def default_user(org: str) -> str:
    return f"integration-{validate_token(org, 'org')}"


def org_account(
    org: str,
    users: Sequence[Mapping[str, Any]],
    names: Iterable[str] = DEFAULT_INTEGRATION_NAMES,
    *,
    cp_account: str = CP_ACCOUNT,
) -> dict[str, Any]:
    """The account of ``org``'s integrations. JetStream stays disabled: all it may use is imported."""
    return {"users": [dict(user) for user in users], "imports": org_imports(org, names, cp_account=cp_account)}


def cp_account_config(users: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An account holding the log: JetStream enabled, the control plane's own (unconfined) users and the
    exports every org account imports from."""
    return {"jetstream": "enabled", "users": [dict(user) for user in users], "exports": cp_exports()}


def render(value: Any) -> str:
    """NATS server configuration text. JSON is valid NATS configuration, and its quoting keeps ``$``,
    ``#``, quotes and braces in names and passwords literal. Wrap account entries in
    ``accounts { "CP": …, "ORG_acme": … }``."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def nats_config(
    org: str,
    names: Iterable[str] = DEFAULT_INTEGRATION_NAMES,
    *,
    user: str | None = None,
    password: str | None = None,
    nkey: str | None = None,
    cp_account: str = CP_ACCOUNT,
) -> str:
    """What ``controlplane nats-config`` prints: instructions as comments, then the org account entry to
    add inside ``accounts { }``."""
    names = _names(names)
    entry = integration_user(org, names, user=user, password=password, nkey=nkey)
    account = org_account(org, [entry], names, cp_account=cp_account)
    consumers = ", ".join(consumer_name(org, name) for name in names)
    dead_letters = ", ".join(dead_letter_subject(org, name) for name in names)
    login = f"nkey {nkey}" if nkey is not None else f"user {entry['user']}"
    export_lines = ",\n".join(f"  {json.dumps(export)}" for export in cp_exports())
    exports = "\n".join(f"#     {line}" for line in f"exports: [\n{export_lines}\n]".splitlines())
    return (
        f"# NATS account for integrations of org {org} (controlplane nats-config {org}).\n"
        f"# Its {login} may create, read and acknowledge only the consumers {consumers} on {org_events_filter(org)}\n"
        f"# and publish only their dead letters ({dead_letters}); it cannot read other orgs, write to the\n"
        f"# log or its timers, or manage streams.\n"
        f"#\n"
        f"# 1. The account that holds {STREAM_NAME} ({cp_account}) needs `jetstream: enabled` and, once for all orgs:\n"
        f"{exports}\n"
        f"# 2. Create the dead-letter stream {DEAD_LETTER_STREAM} there: a confined user may not create streams\n"
        f"#    (integrations.consumer.provision_dead_letter_stream, or any unconfined `controlplane webhook`).\n"
        f"# 3. Add the entry below inside `accounts {{ }}` and reload the server (nats-server --signal reload).\n"
        f"# 4. Run the integration as this user with `--confined` (JetStream API prefix {CONFINED_JS_API_PREFIX}).\n"
        f"{json.dumps(org_account_name(org))}: {render(account)}\n"
    )


def _check_account_name(name: str) -> str:
    if not _ACCOUNT_NAME.fullmatch(name):
        raise ValueError(f"invalid account name {name!r}: use 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return name


def _config_string(value: str, what: str) -> str:
    if not value or len(value) > 256 or any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"invalid {what}: use 1-256 characters without control characters")
    return value


def _checked_nkey(key: str) -> str:
    """A user public nkey: ``U`` + base32 of a 32-byte key and a CRC-16 that catches typos."""
    if not _NKEY_USER.fullmatch(key):
        raise ValueError(f"invalid user nkey {key!r}: expected 56 characters of base32 starting with U")
    raw = base64.b32decode(key)
    if _crc16(raw[:-2]) != int.from_bytes(raw[-2:], "little"):
        raise ValueError(f"invalid user nkey {key!r}: its checksum does not match (a typo?)")
    return key


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum of nkeys."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc
