"""What of an event may leave the control plane. The log keeps every field (the keys read model is
rebuilt from it); every reader outside it (the SSE feed, webhooks, integration consumers, audit
exports) gets the public view, where each field its type names in ``SECRET_FIELDS`` (core/domain/events.py)
holds :data:`REDACTED` instead. The event keeps its shape: the field is there, with a string in it.

Stored payloads are redacted by their ``type`` tag before any upcasting, with today's declaration: a
new version that renames a secret field must keep its old name in ``SECRET_FIELDS`` as well. A payload
of a type this code does not know passes unchanged (nothing says what in it is secret)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from core.domain.events import EVENT_TYPES, Event

REDACTED = "[redacted]"

E = TypeVar("E", bound=Event)


def secret_fields(event_type: str) -> frozenset[str]:
    """The secret fields of the event type tagged ``event_type``; none for a type this code does not know."""
    cls = EVENT_TYPES.get(event_type)
    return frozenset() if cls is None else cls.SECRET_FIELDS


def redacted_fields() -> list[str]:
    """Every ``Type.field`` that is redacted, sorted: what an audit export declares in its header."""
    return sorted(f"{tag}.{name}" for tag, cls in EVENT_TYPES.items() for name in cls.SECRET_FIELDS)


def public_event(event: E) -> E:
    """``event`` as readers outside the log see it: the same type, secret fields redacted."""
    secret = type(event).SECRET_FIELDS
    if not secret:
        return event
    return msgspec.structs.replace(event, **dict.fromkeys(secret, REDACTED))


def public_view(event: Event) -> dict[str, Any]:
    """The public event as JSON-ready builtins (what the SSE feed sends)."""
    view: dict[str, Any] = msgspec.to_builtins(public_event(event))
    return view


def public_payload(stored: Any) -> Any:
    """A stored event decoded as plain JSON (not upcast), its secret fields redacted; anything that is
    not an object of a known event type is returned as it is."""
    if not isinstance(stored, dict) or not isinstance(tag := stored.get("type"), str):
        return stored
    present = secret_fields(tag) & stored.keys()
    return {**stored, **dict.fromkeys(present, REDACTED)} if present else stored


def public_bytes(data: bytes) -> bytes:
    """A stored event's bytes as they may leave: the same bytes unless it has a secret field to redact."""
    try:
        stored = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data
    public = public_payload(stored)
    return data if public is stored else msgspec.json.encode(public)
