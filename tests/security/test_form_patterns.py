"""A form comes from a worker, its answer from a person, and the gateway matches one against the other
on its event loop. With Python's backtracking ``re``, a pattern like ``(a|aa)*$`` and a 41-character
answer held the loop for about 20 s; every pattern is now matched within a bound, and a pattern
that blows it is a 422 for that decision, not a stall for every org."""

from __future__ import annotations

import time

import pytest

from application.forms import PATTERN_SECONDS, check_response
from core.domain.errors import InvalidCommand
from gateway.problems import describe

EVIL = "^(a|aa)*$"
ANSWER = "a" * 40 + "!"


@pytest.mark.parametrize(
    ("form", "response"),
    [
        ({"type": "string", "pattern": EVIL}, ANSWER),
        ({"type": "object", "properties": {"why": {"type": "string", "pattern": EVIL}}}, {"why": ANSWER}),
        ({"type": "object", "patternProperties": {EVIL: {"type": "string"}}}, {ANSWER: "x"}),
    ],
)
def test_a_catastrophic_pattern_is_refused_in_bounded_time(form: dict[str, object], response: object) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidCommand) as refused:
        check_response(form, response, required=True)
    assert time.monotonic() - started < 20 * PATTERN_SECONDS
    status, detail, _ = describe(refused.value) or (None, "", {})
    assert status == 422
    assert "too slow" in detail


def test_ordinary_patterns_still_decide() -> None:
    form = {"type": "object", "properties": {"ticket": {"type": "string", "pattern": "^OPS-[0-9]+$"}}}
    check_response(form, {"ticket": "OPS-42"}, required=True)
    with pytest.raises(InvalidCommand, match="does not match"):
        check_response(form, {"ticket": "ops-42"}, required=True)
