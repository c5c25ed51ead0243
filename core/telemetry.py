"""What ties a log line, an appended event and a span to the request or task it belongs to.

Two things, both read by code that must not know who set them (the command handler in core, the
runner's HTTP client, the log formatter):

- **Context variables**: the correlation id, org and task id of the work in hand. The gateway binds
  them per request, the runner per task, the projector per batch; the log formatter
  (``controlplane/logs.py``) copies them onto every line, and the command handler stores the
  correlation id in the events' headers when its caller gave none.
- **Tracing**, off unless a process calls :func:`enable` (``controlplane/tracing.py`` does when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set). Off, every helper here returns before touching
  OpenTelemetry: no SDK, no context switch, no span object. Trace context crosses processes as a W3C
  ``traceparent`` string (an HTTP header, an event's NATS header), so nothing here needs a carrier.

The pure domain (``core/domain/task.py``, ``core/domain/events.py``, the deciders) never imports this module."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

correlation_id: ContextVar[str | None] = ContextVar("cp_correlation_id", default=None)
org: ContextVar[str | None] = ContextVar("cp_org", default=None)
task_id: ContextVar[str | None] = ContextVar("cp_task_id", default=None)
_VARIABLES: dict[str, ContextVar[str | None]] = {"correlation_id": correlation_id, "org": org, "task_id": task_id}

TRACEPARENT = "traceparent"
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$")
MAX_LINKS = 32
"""Links one span keeps (a projection batch links the traces of its events): a bound, not a sample."""

_tracer: trace.Tracer | None = None


@contextlib.contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """Set some of ``correlation_id``, ``org``, ``task_id`` for the block (None leaves one as it is)."""
    tokens = [(_VARIABLES[name], _VARIABLES[name].set(value)) for name, value in values.items() if value is not None]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def log_context() -> dict[str, str]:
    """The context variables that are set, and the current trace and span ids when tracing is on."""
    values = {name: value for name, variable in _VARIABLES.items() if (value := variable.get()) is not None}
    if _tracer is not None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            values["trace_id"] = format(context.trace_id, "032x")
            values["span_id"] = format(context.span_id, "016x")
    return values


# --- tracing ----------------------------------------------------------------------------------------


def enable(tracer: trace.Tracer) -> None:
    global _tracer
    _tracer = tracer


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The remote span a W3C ``traceparent`` names, or None if it is absent or malformed (version ff,
    an all-zero trace or span id): a bad header starts a new trace, it never fails a request."""
    if not value or len(value) > 512:
        return None
    found = _TRACEPARENT.match(value.strip())
    if found is None or found[1] == "ff":
        return None
    trace_id, span_id = int(found[2], 16), int(found[3], 16)
    if not trace_id or not span_id or (found[1] == "00" and len(value.strip()) != 55):
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(found[4], 16) & 1))


def trace_id_of(value: str | None) -> str | None:
    """The 32 hex digits of a valid ``traceparent``'s trace id."""
    parsed = parse_traceparent(value)
    return None if parsed is None else format(parsed.trace_id, "032x")


def current_traceparent() -> str | None:
    """The current span as a ``traceparent`` value, to send on: None when tracing is off or no span is current."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_trace_id() -> str | None:
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    parent: str | None = None,
    links: Sequence[str | None] = (),
    kind: SpanKind = SpanKind.INTERNAL,
    fine: tuple[type[BaseException], ...] = (),
    dropped: tuple[type[BaseException], ...] = (),
    start_time: int | None = None,
) -> Iterator[Span | None]:
    """A span around the block, current inside it; yields None (and costs nothing) when tracing is off.

    ``parent`` is a ``traceparent`` to continue instead of the current span (a task's trace, from its
    submit); ``links`` are ``traceparent``s of related traces. An ``Exception`` marks the span as an
    error unless it is one of ``fine`` (a rejected command is an answer, not a fault); any other
    ``BaseException`` (a cancellation, a workflow suspending) is recorded as ``cp.outcome`` only. A
    block ending in one of ``dropped`` leaves no span at all: it is never ended, so never exported."""
    tracer = _tracer
    if tracer is None:
        yield None
        return
    context = None
    if parent is not None and (remote := parse_traceparent(parent)) is not None:
        context = trace.set_span_in_context(NonRecordingSpan(remote))
    kept = [Link(found) for found in map(parse_traceparent, dict.fromkeys(links)) if found is not None]
    current = tracer.start_span(
        name,
        context=context,
        kind=kind,
        attributes={key: value for key, value in (attributes or {}).items() if value is not None},
        links=kept[:MAX_LINKS],
        start_time=start_time,
    )
    token = otel_context.attach(trace.set_span_in_context(current))
    end = True
    try:
        yield current
    except dropped:
        end = False
        raise
    except fine as exc:
        current.set_attribute("cp.outcome", type(exc).__name__)
        raise
    except Exception as exc:
        current.record_exception(exc)
        current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        raise
    except BaseException as exc:
        current.set_attribute("cp.outcome", type(exc).__name__)
        raise
    finally:
        otel_context.detach(token)
        if end:
            current.end()


def record_span(
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any] | None = None,
    *,
    parent: str | None = None,
) -> None:
    """A span for something that already happened (how long an approval waited, known when a later
    claim replays past it), under ``parent`` or the current span."""
    tracer = _tracer
    if tracer is None:
        return
    context = None
    if parent is not None and (remote := parse_traceparent(parent)) is not None:
        context = trace.set_span_in_context(NonRecordingSpan(remote))
    attributes = {key: value for key, value in (attributes or {}).items() if value is not None}
    tracer.start_span(name, context=context, attributes=attributes, start_time=start_ns).end(end_time=end_ns)


def set_attributes(current: Span | None, attributes: Mapping[str, Any]) -> None:
    """Attributes on a span from :func:`span` (None when tracing is off: then nothing is done)."""
    if current is not None:
        current.set_attributes({key: value for key, value in attributes.items() if value is not None})


def annotate(attributes: Mapping[str, Any]) -> None:
    """Attributes on the current span, if tracing is on and one is current."""
    if _tracer is not None:
        trace.get_current_span().set_attributes({key: value for key, value in attributes.items() if value is not None})
