"""Subject naming for the log. Events live on ``cp.<org>.<aggregate>.<id>``; the definitions of
durable timers live on ``cpsched.<org>.<aggregate>.<id>.<key>`` so that consumers of ``cp.>`` never
see them, only the events they fire into the aggregate's own subject."""

from __future__ import annotations

import re
from typing import NamedTuple

from core.domain.ids import validate_token

EVENTS_PREFIX = "cp"
SCHEDULES_PREFIX = "cpsched"
STREAM_SUBJECTS = (f"{EVENTS_PREFIX}.>", f"{SCHEDULES_PREFIX}.>")


class AggregateAddress(NamedTuple):
    org: str
    aggregate: str
    id: str


def aggregate_subject(org: str, aggregate: str, aggregate_id: str) -> str:
    validate_token(org, "org")
    validate_token(aggregate, "aggregate type")
    validate_token(aggregate_id, f"{aggregate} id")
    return f"{EVENTS_PREFIX}.{org}.{aggregate}.{aggregate_id}"


def org_events_filter(org: str, aggregate: str | None = None) -> str:
    """Every event of ``org``, or only those of its aggregates of one type."""
    everything = f"{EVENTS_PREFIX}.{validate_token(org, 'org')}.>"
    return everything if aggregate is None else f"{EVENTS_PREFIX}.{org}.{validate_token(aggregate, 'aggregate type')}.*"


def parse_aggregate_subject(subject: str) -> AggregateAddress:
    """``(org, aggregate, id)`` of an event subject ``cp.<org>.<aggregate>.<id>``; ValueError for any
    other subject. The one place a subject is taken apart."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != EVENTS_PREFIX:
        raise ValueError(f"not an aggregate subject: {subject!r}")
    return AggregateAddress(parts[1], parts[2], parts[3])


_TIMER_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")


def schedule_subject(aggregate_subject_: str, timer_key: str) -> str:
    address = parse_aggregate_subject(aggregate_subject_)
    if not _TIMER_KEY.fullmatch(timer_key):
        raise ValueError(f"invalid timer key {timer_key!r}")
    return f"{SCHEDULES_PREFIX}.{address.org}.{address.aggregate}.{address.id}.{timer_key}"
