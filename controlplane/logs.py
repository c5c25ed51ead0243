"""How every ``controlplane`` process logs: JSON lines for machines, or text for a person at a terminal.

``CP_LOG_FORMAT=json|text`` chooses; unset, a process whose log stream (stderr) is a terminal writes
text and any other writes JSON, so ``controlplane dev`` in a terminal stays readable while the log
files of its projector and runner children are JSON. A JSON line carries ``time`` (RFC 3339, UTC),
``level``, ``process`` (gateway, projector, runner or cli), ``logger``, ``message`` and, when the work
in hand is known, ``org``, ``task_id``, ``correlation_id`` and (with tracing on) ``trace_id`` and
``span_id``; an exception adds ``exc_info``. See docs/operations.md, "Logs"."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from core import telemetry

FORMAT_ENV = "CP_LOG_FORMAT"
LEVEL_ENV = "CP_LOG_LEVEL"
FORMATS = ("json", "text")
QUIETER = {"pgserver": logging.WARNING, "httpx": logging.WARNING}
"""Loggers turned down: a line per HTTP request (httpx) or per embedded-database step drowns what matters."""


class ContextFilter(logging.Filter):
    """Stamps each record with the process name and the context variables of the work it was logged in."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process
        context = telemetry.log_context()
        for name in ("org", "task_id", "correlation_id", "trace_id", "span_id"):
            # An explicit ``extra=`` wins over the context.
            if not hasattr(record, name):
                setattr(record, name, context.get(name))
        return True


class _Json(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # Fields with no value are left out rather than written as null: a line says what is known.
        return {key: value for key, value in log_data.items() if value is not None}


class _Text(logging.Formatter):
    """``time LEVEL process logger: message [org=… task=… cid=…]``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        known = [
            f"{label}={value}"
            for label, name in (("org", "org"), ("task", "task_id"), ("cid", "correlation_id"))
            if (value := getattr(record, name, None))
        ]
        if not known:
            return line
        head, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{head} [{' '.join(known)}]{newline}{rest}"


def chosen_format(stream: TextIO, environ: Mapping[str, str] = os.environ) -> str:
    chosen = environ.get(FORMAT_ENV, "").strip().lower()
    if chosen:
        if chosen not in FORMATS:
            raise ValueError(f"{FORMAT_ENV} must be one of {', '.join(FORMATS)}, not {chosen!r}")
        return chosen
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "json"


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return _Json(
            "{asctime}{levelname}{process_name}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "process_name": "process", "name": "logger"},
            json_ensure_ascii=False,
        )
    return _Text("%(asctime)s %(levelname)s %(process_name)s %(name)s: %(message)s")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it instead of doubling every line."""


def configure_logging(process: str, *, stream: TextIO | None = None, kind: str | None = None) -> str | None:
    """Send every logger's records to ``stream`` (stderr) in the chosen format; returns the format.
    Like ``logging.basicConfig``, leaves logging alone (and returns None) when something else already
    configured the root logger: a program that embeds ``controlplane.cli.main``, or pytest."""
    stream = stream or sys.stderr
    kind = kind or chosen_format(stream)
    level = os.environ.get(LEVEL_ENV, "INFO").strip().upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"{LEVEL_ENV} must be a level name such as INFO or DEBUG, not {level!r}")
    for name, quieter in QUIETER.items():
        logging.getLogger(name).setLevel(quieter)
    root = logging.getLogger()
    if any(not isinstance(handler, _Handler) for handler in root.handlers):
        return None
    handler = _Handler(stream)
    handler.setFormatter(formatter(kind))
    handler.addFilter(ContextFilter(process))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return kind


LIBRARY_HANDLERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
"""Loggers a library gives a stream handler of its own at import (LiteLLM writes ``12:00:00 - LiteLLM:INFO``
lines to stderr): :func:`adopt` takes them over."""


def adopt(names: tuple[str, ...] = LIBRARY_HANDLERS) -> None:
    """Drop the handlers a library attached to its loggers, so their records reach only the process's
    own handler, in its format: a JSON log must not be interleaved with another format's lines."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
