"""Identifier tokens: everything that reaches a NATS subject passes through here first."""

from __future__ import annotations

import os
import re
import time
from typing import Annotated

import msgspec

TOKEN_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_TOKEN = re.compile(TOKEN_PATTERN)

Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN, description="lowercase token [a-z0-9][a-z0-9_-]{0,62}")]

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


class InvalidToken(ValueError):
    """A value that would be unsafe or ambiguous inside a NATS subject."""


def validate_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidToken(
            f"invalid {what} {value!r}: use 1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    return value


def new_id(now_ms: int | None = None, randomness: bytes | None = None) -> str:
    """A lowercase ULID: sortable by creation time, safe as a subject token."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = os.urandom(10) if randomness is None else randomness
    value = (ms << 80) | int.from_bytes(rand, "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
