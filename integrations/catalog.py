"""The event catalog: every event type, its version and its fields, rendered as markdown from the msgspec
types in ``core.domain.events``. ``python -m integrations.catalog > docs/events.md``; a test fails when the
committed file differs from what this renders."""

from __future__ import annotations

import ast
import inspect
import itertools
import sys
import textwrap
import types
import typing
from datetime import datetime
from typing import Any, Literal

import msgspec

from core.domain import events
from core.domain.events import EVENT_TYPES, UPCASTERS, Event
from core.domain.public import REDACTED

COMMAND = "python -m integrations.catalog > docs/events.md"

_GROUPS: tuple[tuple[str, Any, str], ...] = (
    ("Tasks, approvals and workflows", events.TaskEvent, "`cp.<org>.task.<task id>`"),
    ("Workers", events.WorkerEvent, "`cp.<org>.worker.<worker id>`"),
    ("Orgs", events.OrgCreated, "`cp.<org>.org.<org>`"),
    ("API keys", events.ApiKeyCreated | events.ApiKeyRevoked, "`cp.<org>.apikey.<key id>`"),
    ("Policy bundles", events.PolicyBundlePushed, "`cp.<org>.policy.bundles`"),
    ("Environments", events.EnvironmentEvent, "`cp.<org>.environments.all`"),
    ("Queue settings", events.QueueEvent, "`cp.<org>.queues.all`"),
    (
        "Schedules",
        events.ScheduleEvent,
        "`cp.<org>.schedule.<schedule id>` (`ScheduleFired`, the fire, on `cp.<org>.schedulefire.<schedule id>`)",
    ),
    ("Worker configuration", events.WorkerConfigEvent, "`cp.<org>.workerconfig.all`"),
    ("Secrets", events.SecretEvent, "`cp.<org>.secrets.all` (`SecretRead`, the audit of a read, is on the task)"),
    ("Notification channels and rules", events.NotificationConfigEvent, "`cp.<org>.notifications.all`"),
    ("Notifications sent", events.NotificationEvent, "`cp.<org>.notification.<notification id>`"),
)

_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    datetime: "RFC 3339 time",
    Any: "any JSON",
    type(None): "null",
    bytes: "base64 string",
}

_PREAMBLE = f"""\
# Event catalog

Generated from `core/domain/events.py` by `{COMMAND}`; do not edit by hand.

Every event is one JSON object stored on the subject of its aggregate, `cp.<org>.<aggregate>.<id>`, in
the JetStream stream `CP_EVENTS`. Integrations read them through `integrations.consumer.EventSubscription`
(a durable consumer on `cp.<org>.>`) or the webhook forwarder (`controlplane webhook`).

Every event has these fields besides its own:

| field | type | meaning |
|---|---|---|
| `type` | string | the event type, one of the headings below |
| `v` | integer | the schema version of the payload |
| `at` | RFC 3339 time | when the fact became true |

Message headers carry `Cp-Actor` (who caused it; `system:timer` for a fired timer), `Cp-Time`, and when
known `Cp-Correlation-Id` and `Cp-Causation-Id`; `Nats-Msg-Id` is `<command id>:<index>` for events
appended by a command. Events marked *timer* are fired by durable timers into the aggregate's subject
(a schedule's fire into a subject beside it); folding one whose guarded thing has moved on changes
nothing.

Versions: old events are never rewritten. When a type's schema changes its version goes up, and readers
upcast older payloads on the fly (`core.domain.events.UPCASTERS`), so a consumer built on this code always sees
the version listed here. A payload newer than the reader's code is refused, never guessed.
"""


def render_catalog() -> str:
    grouped = [(title, typing.get_args(union) or (union,), subject) for title, union, subject in _GROUPS]
    covered = {cls for _, members, _ in grouped for cls in members}
    if missing := set(EVENT_TYPES.values()) - covered:
        raise RuntimeError(f"event types in no catalog group: {sorted(cls.__name__ for cls in missing)}")
    nested: dict[str, type[msgspec.Struct]] = {}
    parts = [_PREAMBLE, "## Index\n", "| type | version | aggregate subject | timer |", "|---|---|---|---|"]
    for _, members, subject in grouped:
        for cls in members:
            timer = "yes" if _is_timer(cls) else ""
            parts.append(f"| [{_tag(cls)}](#{_tag(cls).lower()}) | {cls.VERSION} | {subject} | {timer} |")
    parts.append("")
    for title, members, subject in grouped:
        parts.append(f"## {title}\n\nSubject: {subject}.\n")
        parts.extend(_render_event(cls, nested) for cls in members)
    parts.append("## Nested objects\n")
    rendered: set[str] = set()
    while pending := sorted(set(nested) - rendered):
        for name in pending:
            parts.append(_render_struct(name, nested[name], nested))
            rendered.add(name)
    return "\n".join(parts).rstrip() + "\n"


def _tag(cls: type[Event]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def _is_timer(cls: type) -> bool:
    return (cls.__doc__ or "").startswith("timer:")


def _render_event(cls: type[Event], nested: dict[str, type[msgspec.Struct]]) -> str:
    tag = _tag(cls)
    older = sorted(version for event_type, version in UPCASTERS if event_type == tag)
    upcast = f"; older payloads (v{', v'.join(map(str, older))}) are upcast when read" if older else ""
    lines = [f"### {tag}\n", f"Version {cls.VERSION}{upcast}."]
    if cls.__doc__:
        lines.append("\n" + _clean_doc(cls.__doc__))
    if cls.SECRET_FIELDS:
        names = ", ".join(f"`{name}`" for name in sorted(cls.SECRET_FIELDS))
        lines.append(
            f"\n*Secret:* {names} never leaves the log: the SSE feed, webhooks, `EventSubscription` handlers "
            f'and audit exports get `"{REDACTED}"` in its place.'
        )
    lines.append("")
    lines.append(_field_table(cls, {field.name for field in msgspec.structs.fields(Event)}, nested))
    return "\n".join(lines) + "\n"


def _render_struct(name: str, cls: type[msgspec.Struct], nested: dict[str, type[msgspec.Struct]]) -> str:
    lines = [f"### {name}\n"]
    if cls.__doc__:
        lines.append(_clean_doc(cls.__doc__) + "\n")
    lines.append(_field_table(cls, set(), nested))
    return "\n".join(lines) + "\n"


def _field_table(cls: type[msgspec.Struct], skip: set[str], nested: dict[str, type[msgspec.Struct]]) -> str:
    fields = [field for field in msgspec.structs.fields(cls) if field.name not in skip]
    if not fields:
        return "No fields of its own."
    docs = _attribute_docs(cls)
    header = ["field", "type", "when absent", *(["meaning"] if docs else [])]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for field in fields:
        absent = "required" if field.required else f"`{msgspec.json.encode(field.default).decode()}`"
        row = f"| `{field.encode_name}` | {_render_type(field.type, nested)} | {absent} |"
        if docs:
            row += f" {' '.join(docs.get(field.name, '').split())} |"
        rows.append(row)
    return "\n".join(rows)


def _render_type(tp: Any, nested: dict[str, type[msgspec.Struct]]) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return _SCALARS[tp]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_render_type(arg, nested) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(f'`"{value}"`' for value in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"array of {_render_type(args[0], nested)}"
    if origin is dict:
        return f"object of {_render_type(args[1], nested)}"
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        nested[tp.__name__] = tp
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    raise TypeError(f"the catalog cannot describe the field type {tp!r}: teach integrations/catalog.py about it")


def _attribute_docs(cls: type) -> dict[str, str]:
    """Docstrings written under fields (PEP 257 attribute docstrings), which Python does not keep."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = following.value.value
    return docs


def _clean_doc(doc: str) -> str:
    text = " ".join(inspect.cleandoc(doc).split()).replace("``", "`")
    return f"*Timer:* {text.removeprefix('timer: ')}" if text.startswith("timer: ") else text


if __name__ == "__main__":
    sys.stdout.write(render_catalog())
