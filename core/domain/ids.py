"""Identifier tokens: everything that reaches a NATS subject passes through here first."""

from __future__ import annotations

import os
import re
import time
from typing import Annotated

import msgspec


def whole(pattern: str) -> str:
    """``pattern`` anchored to match whole strings only, as msgspec's ``Meta(pattern=...)`` needs: msgspec
    *searches*, and in Python's ``re`` a ``$`` also matches before a final newline (so ``^q$`` accepts
    ``"q\\n"``). ``\\Z`` would anchor for Python but reads as a literal ``Z`` to the ECMA-262 regexes of
    JSON Schema that clients of /openapi.json use; "no character follows" is the end in both."""
    return rf"^(?:{pattern})(?![\s\S])"


TOKEN_PATTERN = whole(r"[a-z0-9][a-z0-9_-]{0,62}")
_TOKEN = re.compile(TOKEN_PATTERN)

Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN, description="lowercase token [a-z0-9][a-z0-9_-]{0,62}")]


class InvalidToken(ValueError):
    """A value that would be unsafe or ambiguous inside a NATS subject."""


def validate_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidToken(
            f"invalid {what} {value!r}: use 1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    return value


def new_id(now_ms: int | None = None, randomness: bytes | None = None) -> str:
    """A time-ordered id: 48-bit milliseconds then 80 random bits, in fixed-width lowercase hex, so
    ids sort by creation time and are safe as subject tokens."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{ms:012x}{(os.urandom(10) if randomness is None else randomness).hex()}"
