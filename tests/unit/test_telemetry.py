"""Request ids, traceparent parsing and the log formats, without servers."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.logs import ContextFilter, chosen_format, configure_logging, formatter
from core import telemetry
from gateway.observe import request_id_from

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case is not hex here
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has no extra fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "x" * 1000,
    ],
)
def test_a_malformed_traceparent_names_no_trace(value: str | None) -> None:
    assert telemetry.parse_traceparent(value) is None
    assert telemetry.trace_id_of(value) is None


def test_a_valid_traceparent_names_its_trace_and_a_later_version_may_add_fields() -> None:
    assert telemetry.trace_id_of(VALID) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert telemetry.trace_id_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more") is not None


def test_the_request_id_is_the_callers_then_the_traces_then_none() -> None:
    assert request_id_from("abc-1:2.3_x", VALID) == "abc-1:2.3_x"
    assert request_id_from("not ok", VALID) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert request_id_from("x" * 129, None) is None
    assert request_id_from("_leading", "garbage") is None


@given(st.text(max_size=300))
def test_an_accepted_request_id_is_always_a_bounded_token(value: str) -> None:
    accepted = request_id_from(value, None)
    assert accepted is None or (accepted == value and 1 <= len(value) <= 128 and value.isascii())
    assert accepted is None or not any(c in value for c in " \t\r\n\"'<>;%/\\")


def test_without_tracing_spans_cost_nothing_and_send_no_traceparent() -> None:
    telemetry.disable()
    with telemetry.span("anything", {"a": 1}, parent=VALID) as span:
        assert span is None
        assert telemetry.current_traceparent() is None


@pytest.fixture
def record() -> logging.LogRecord:
    return logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "hello %s", ("world",), None)


def test_a_json_line_has_the_fields_and_the_context(record: logging.LogRecord) -> None:
    with telemetry.bound(org="acme", task_id="t1", correlation_id="req-1"):
        assert ContextFilter("gateway").filter(record)
    line = json.loads(formatter("json").format(record))
    assert line["time"].endswith("Z")
    assert {key: line[key] for key in ("level", "process", "logger", "message")} == {
        "level": "INFO",
        "process": "gateway",
        "logger": "gateway.access",
        "message": "hello world",
    }
    assert (line["org"], line["task_id"], line["correlation_id"]) == ("acme", "t1", "req-1")
    assert "trace_id" not in line  # unknown fields are left out, not null


def test_a_text_line_names_the_context_after_the_message(record: logging.LogRecord) -> None:
    with telemetry.bound(correlation_id="req-1"):
        ContextFilter("runner").filter(record)
    assert formatter("text").format(record).endswith("INFO runner gateway.access: hello world [cid=req-1]")


def test_the_format_follows_the_variable_else_the_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert chosen_format(Terminal(), {}) == "text"
    assert chosen_format(io.StringIO(), {}) == "json"
    assert chosen_format(Terminal(), {"CP_LOG_FORMAT": "JSON"}) == "json"
    with pytest.raises(ValueError, match="CP_LOG_FORMAT"):
        chosen_format(io.StringIO(), {"CP_LOG_FORMAT": "xml"})


def test_logging_configured_by_someone_else_is_left_alone() -> None:
    """Under pytest the root logger has pytest's handlers: configuring must not take them away."""
    root = logging.getLogger()
    before = list(root.handlers)
    assert before  # pytest's
    assert configure_logging("cli", stream=io.StringIO(), kind="json") is None
    assert root.handlers == before
