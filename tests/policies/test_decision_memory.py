"""The evaluator remembers decisions of bundles whose rules depend on the input alone, so a repeated
question costs no worker, and never remembers one whose rules read the clock or draw random numbers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from policies_wasm.budget import DECISION_MEMORY, Budget, PolicyEvaluator, answers_from_input_alone
from policies_wasm.engine import SOURCES_DIR, Bundle, PolicyError

ENTRYPOINT = "# METADATA\n# entrypoint: true\n"
PURE = Bundle(modules={"pure.rego": f"package t\n\n{ENTRYPOINT}next := input.n + 1\n"})
CLOCK = Bundle(modules={"clock.rego": f"package t\n\n{ENTRYPOINT}next := [input.n + 1, time.now_ns()]\n"})


@pytest.fixture
async def evaluator() -> AsyncIterator[PolicyEvaluator]:
    evaluator = PolicyEvaluator(Budget(ms=1000, workers=2, quarantine_seconds=0.5))
    try:
        yield evaluator
    finally:
        evaluator.close()


async def test_a_repeated_question_is_answered_from_memory_with_the_same_digests(evaluator: PolicyEvaluator) -> None:
    first = await evaluator.evaluate(PURE, "t/next", {"n": 1}, owner="acme")
    again = await evaluator.evaluate(PURE, "t/next", {"n": 1}, owner="acme")
    other = await evaluator.evaluate(PURE, "t/next", {"n": 2}, owner="acme")
    assert (first.value, again.value, other.value) == (2, 2, 3)
    assert evaluator.remembered == 1
    assert (again.bundle_digest, again.input_digest, again.engine) == (
        first.bundle_digest,
        first.input_digest,
        first.engine,
    )
    assert again.duration_ms == 0.0


async def test_a_question_asked_many_times_at_once_is_evaluated_once(evaluator: PolicyEvaluator) -> None:
    answers = await asyncio.gather(*(evaluator.evaluate(PURE, "t/next", {"n": 7}, owner="acme") for _ in range(20)))
    assert {answer.value for answer in answers} == {8}
    assert evaluator.remembered == 19, "the other 19 waited for the first answer"


async def test_a_failed_evaluation_leaves_the_question_to_the_next_one_asking(evaluator: PolicyEvaluator) -> None:
    failing = Bundle(modules={"fail.rego": f"package t\n\n{ENTRYPOINT}next := input.n / input.d\n"})
    results = await asyncio.gather(
        *(evaluator.evaluate(failing, "t/next", {"n": 1, "d": 0}) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(result, PolicyError) for result in results), results
    assert evaluator.remembered == 0


async def test_the_memory_is_per_bundle_and_entrypoint(evaluator: PolicyEvaluator) -> None:
    changed = Bundle(modules={"pure.rego": f"package t\n\n{ENTRYPOINT}next := input.n + 10\n"})
    assert (await evaluator.evaluate(PURE, "t/next", {"n": 1})).value == 2
    assert (await evaluator.evaluate(changed, "t/next", {"n": 1})).value == 11
    assert evaluator.remembered == 0


async def test_rules_that_read_the_clock_are_evaluated_every_time(evaluator: PolicyEvaluator) -> None:
    first = await evaluator.evaluate(CLOCK, "t/next", {"n": 1})
    again = await evaluator.evaluate(CLOCK, "t/next", {"n": 1})
    assert evaluator.remembered == 0
    assert first.value[1] < again.value[1]


async def test_the_memory_is_bounded(evaluator: PolicyEvaluator) -> None:
    for n in range(DECISION_MEMORY + 1):
        await evaluator.evaluate(PURE, "t/next", {"n": n})
    await evaluator.evaluate(PURE, "t/next", {"n": 0})  # the oldest was forgotten: evaluated again
    assert evaluator.remembered == 0
    await evaluator.evaluate(PURE, "t/next", {"n": DECISION_MEMORY})
    assert evaluator.remembered == 1


def test_the_shipped_policies_depend_on_their_input_alone() -> None:
    assert answers_from_input_alone(Bundle.from_dir(SOURCES_DIR))
    assert not answers_from_input_alone(CLOCK)
    assert not answers_from_input_alone(Bundle(modules={}, wasm=b"\0asm"))
