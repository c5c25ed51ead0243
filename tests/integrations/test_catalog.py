"""docs/events.md is the catalog rendered from core.domain.events, and it names every type, version and field."""

from __future__ import annotations

from pathlib import Path

import msgspec

from core.domain.events import EVENT_TYPES
from integrations.catalog import COMMAND, render_catalog

CATALOG = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def test_the_committed_catalog_is_up_to_date() -> None:
    assert CATALOG.read_text() == render_catalog(), f"docs/events.md is stale: run `{COMMAND}`"


def test_the_catalog_lists_every_event_type_with_its_version_and_fields() -> None:
    sections = {section.split("\n", 1)[0]: section for section in render_catalog().split("\n### ")[1:]}
    for event_type, cls in EVENT_TYPES.items():
        section = sections[event_type]
        assert f"Version {cls.VERSION}" in section
        for field in msgspec.structs.fields(cls):
            assert f"| `{field.encode_name}` |" in section or field.name in ("v", "at"), (event_type, field.name)
