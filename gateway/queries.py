"""Query strings of docs/api.md, one struct per route, read by ``gateway.http.query`` with the typed
validation bodies get (msgspec, the bounds of core.domain.commands): a number is ASCII digits and bounded, an id
is a token, a value from a list is one of the list, and whatever reaches PostgreSQL or NATS has been checked first. A
value of the wrong type, out of bounds, holding NUL or given twice is a 422; an empty value is the same
as none (what an HTML form sends for a blank field); unknown parameters are ignored, as body fields are."""

from __future__ import annotations

from datetime import UTC
from functools import cache
from typing import Annotated, Literal

import msgspec
import msgspec.inspect as types

from core.domain.commands import Capability, EnvironmentName, Name
from core.domain.events import EVENT_TYPES, Priority, TaskStatus
from core.domain.ids import Token, validate_token, whole
from projections.read.paging import MAX_PAGE, decode_cursor

MAX_SEQ = 2**63 - 1
"""The largest stream sequence a client may name (JetStream's own are unsigned 64-bit)."""

Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ, description="a stream sequence number")]
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)]
Cursor = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=512, pattern=whole("[A-Za-z0-9_-]+"), description="the next_cursor of a page"
    ),
]
ApprovalStatus = Literal["pending", "approved", "rejected", "timed_out"]
EventTypeList = Annotated[str, msgspec.Meta(max_length=4096, description="comma-separated event types")]


class Query(msgspec.Struct, frozen=True):
    """The base of every query struct: ``gateway.http.query`` reads any of them."""


class ReadAfter(Query, frozen=True):
    min_seq: Seq | None = None


MAX_WAIT_SECONDS = 60


class TaskRead(Query, frozen=True):
    """``?wait_seconds=N``: answer once the task is terminal, or after N seconds with its state then."""

    wait_seconds: Annotated[int, msgspec.Meta(ge=0, le=MAX_WAIT_SECONDS)] = 0


class Page(Query, frozen=True):
    limit: Limit = 100
    cursor: Cursor | None = None

    def __post_init__(self) -> None:
        if self.cursor is not None:
            _check_cursor(self.cursor)


class TaskList(Page, frozen=True):
    status: TaskStatus | None = None
    queue: Token | None = None
    priority: Priority | None = None
    workflow: Name | None = None


class ApprovalList(Page, frozen=True):
    status: ApprovalStatus | None = None
    task_id: Token | None = None


class WorkerList(Query, frozen=True):
    queue: Token | None = None
    capability: Capability | None = None
    available: Literal["true", "false"] | None = None


class EnvironmentScope(Query, frozen=True):
    """``?environment=``: one environment's own setting instead of the org's."""

    environment: EnvironmentName | None = None


class ResumeAfter(Query, frozen=True):
    """Where an event stream starts: after ``Last-Event-ID`` (the header) or ``?after=``."""

    after: Seq = 0


class OrgEvents(ResumeAfter, frozen=True):
    types: EventTypeList | None = None
    queue: Token | None = None

    def __post_init__(self) -> None:
        if unknown := self.type_set - set(EVENT_TYPES):
            raise ValueError(f"unknown event types {sorted(unknown)}; known: {sorted(EVENT_TYPES)}")

    @property
    def type_set(self) -> set[str]:
        return {name.strip() for name in (self.types or "").split(",") if name.strip()}


@cache
def whole_numbers(kind: type[Query]) -> frozenset[str]:
    """The parameters of ``kind`` that take an integer: their text must be ASCII digits, nothing else
    (no sign, exponent, fraction, blank or other script's digits, which ``int()`` or msgspec take)."""
    return frozenset(field.name for field in types.type_info(kind).fields if _is_int(field.type))  # type: ignore[attr-defined]


def _is_int(info: types.Type) -> bool:
    match info:
        case types.UnionType():
            return any(_is_int(t) for t in info.types)
        case types.Metadata():
            return _is_int(info.type)
    return isinstance(info, types.IntType)


def expected(kind: type[Query], name: str) -> str:
    """What the parameter ``name`` of ``kind`` takes, in words, for a 422 to say."""
    field = next(field for field in types.type_info(kind).fields if field.name == name)  # type: ignore[attr-defined]
    return _in_words(field.type)


def _in_words(info: types.Type) -> str:
    match info:
        case types.UnionType():
            return " or ".join(_in_words(t) for t in info.types if not isinstance(t, types.NoneType))
        case types.Metadata() if isinstance(info.type, types.StrType) and info.type.pattern:
            return str((info.extra_json_schema or {}).get("description", f"text matching {info.type.pattern}"))
        case types.Metadata():
            return _in_words(info.type)
        case types.IntType() if info.ge == 0:
            return f"a non-negative integer, at most {info.le}"
        case types.IntType():
            return f"an integer from {info.ge} to {info.le}"
        case types.LiteralType():
            return "one of " + ", ".join(map(str, info.values))
        case types.StrType():
            return f"text of {info.min_length or 0} to {info.max_length} characters"
    return "another value"


def _check_cursor(cursor: str) -> None:
    """A cursor is what a page's ``next_cursor`` was: its position must be a real time and id."""
    created_at, item_id = decode_cursor(cursor)  # ValueError saying what to send
    if created_at.tzinfo is None:
        raise ValueError(f"invalid cursor {cursor[:64]!r}: pass back the next_cursor of a previous page")
    try:
        created_at.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"invalid cursor {cursor[:64]!r}: pass back the next_cursor of a previous page") from None
    validate_token(item_id, "cursor position")
