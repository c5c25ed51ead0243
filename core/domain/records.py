"""The record of an event as the log stored it: the event, its place in the log (sequence, subject)
and its headers. Storage-neutral, so history folding, projections and the claim index read it without
depending on the NATS adapter that produces it."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from core.domain.events import AnyEvent


class RecordedEvent(msgspec.Struct, frozen=True):
    seq: int
    subject: str
    event: AnyEvent
    recorded_at: datetime
    command_id: str | None = None
    actor: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
