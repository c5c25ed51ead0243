"""Old events are never rewritten: they are read through upcasters; unknown ones fail clearly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.domain import events
from core.domain.events import TaskCancelled, UnknownEvent, decode_event, encode_event


def test_an_old_version_is_read_through_its_upcaster(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend TaskCancelled moved to v2, renaming "reason" from an older "why".
    monkeypatch.setattr(TaskCancelled, "VERSION", 2)
    monkeypatch.setitem(
        events.UPCASTERS,
        ("TaskCancelled", 1),
        lambda raw: {**{k: v for k, v in raw.items() if k != "why"}, "reason": raw.get("why")},
    )
    old = b'{"type":"TaskCancelled","v":1,"at":"2026-01-01T00:00:00Z","by":"alice","why":"obsolete"}'
    event = decode_event(old)
    assert isinstance(event, TaskCancelled)
    assert event.reason == "obsolete"
    assert event.v == 2


def test_a_newer_or_unknown_event_is_refused_with_a_clear_message() -> None:
    with pytest.raises(UnknownEvent, match="newer than this code"):
        decode_event(b'{"type":"TaskCancelled","v":9,"at":"2026-01-01T00:00:00Z","by":"a","reason":null}')
    with pytest.raises(UnknownEvent, match="unknown event type"):
        decode_event(b'{"type":"TaskTeleported","v":1}')


def test_current_events_round_trip_unchanged() -> None:
    event = TaskCancelled(at=datetime(2026, 1, 1, tzinfo=UTC), by="alice", reason=None)
    assert decode_event(encode_event(event)) == event
