"""Pages of a list: the size bound and the cursor, opaque to clients, that says where the next page starts."""

from __future__ import annotations

import base64
from datetime import datetime

import msgspec

MAX_PAGE = 500

_cursor_decoder = msgspec.json.Decoder(tuple[datetime, str])


def encode_cursor(created_at: datetime, item_id: str) -> str:
    """Opaque to clients: the position after the last item of a page, in (created_at, id) order."""
    return base64.urlsafe_b64encode(msgspec.json.encode((created_at, item_id))).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        return _cursor_decoder.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, msgspec.DecodeError):  # binascii.Error is a ValueError
        raise ValueError(f"invalid cursor {cursor[:64]!r}: pass back the next_cursor of a previous page") from None
