"""The regopy engine's contract beyond the shipped cases: compile once per bundle version, clear
errors for Rego that does not compile or fails at run time, nothing printed on the process's stdout."""

from __future__ import annotations

import re
import threading

import pytest

from policies_wasm import rego as rego_module
from policies_wasm.engine import (
    SOURCES_DIR,
    Bundle,
    PolicyError,
    PolicyEvaluationError,
    PolicyInputError,
    PolicyLoadError,
    PolicyUndefined,
    UnknownEntrypoint,
)
from policies_wasm.rego import RegoEngine

ENTRYPOINT = "# METADATA\n# entrypoint: true\n"


def rego_bundle(source: str, data: dict | None = None) -> Bundle:
    return Bundle(modules={"test.rego": source}, data=data or {})


def loaded(bundle: Bundle) -> RegoEngine:
    engine = RegoEngine()
    engine.load(bundle)
    return engine


def test_a_bundle_is_compiled_once_per_version(monkeypatch: pytest.MonkeyPatch) -> None:
    compilations: list[str] = []
    compile_bundle = rego_module._compile

    def counting(bundle: Bundle) -> rego_module._CompiledBundle:
        compilations.append(bundle.digest)
        return compile_bundle(bundle)

    monkeypatch.setattr(rego_module, "_compile", counting)
    engine = RegoEngine()
    shipped = Bundle.from_dir(SOURCES_DIR)
    engine.load(shipped)
    engine.load(Bundle.from_dir(SOURCES_DIR))
    engine.load(shipped.with_data({"policy_config": {**shipped.data["policy_config"], "orgs": {"acme": {}}}}))
    assert len(compilations) == 2


def test_data_is_part_of_the_bundle() -> None:
    engine = loaded(rego_bundle(f"package t\n{ENTRYPOINT}limit := data.limits.tokens\n", {"limits": {"tokens": 7}}))
    assert engine.evaluate("t/limit", {}).value == 7


def test_rego_that_does_not_parse_is_refused_with_the_location() -> None:
    with pytest.raises(PolicyLoadError, match=r"does not compile:(.|\n)*Invalid collection(.|\n)*test\.rego:4:6"):
        loaded(rego_bundle(f"package t\n{ENTRYPOINT}x := {{k | some k, _ in y}} | {{1}}\n"))


def test_rego_that_parses_but_does_not_build_is_refused_with_the_compiler_message() -> None:
    with pytest.raises(PolicyLoadError, match="conflicting definitions"):
        loaded(rego_bundle(f"package t\nf(a, a)\n{ENTRYPOINT}x := 1\n"))


def test_a_bundle_without_entrypoints_is_refused() -> None:
    with pytest.raises(PolicyLoadError, match="declares no entrypoints"):
        loaded(rego_bundle("package t\nx := 1\n"))
    with pytest.raises(PolicyLoadError, match="has no Rego modules"):
        loaded(Bundle(modules={}))


def test_compile_errors_do_not_reach_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PolicyLoadError):
        loaded(rego_bundle(f"package t\nf(a, a)\n{ENTRYPOINT}x := 1\n"))
    assert capfd.readouterr().out == ""


def test_an_undefined_decision_is_not_a_value() -> None:
    engine = loaded(rego_bundle(f"package t\n{ENTRYPOINT}x := input.missing\n"))
    with pytest.raises(PolicyUndefined, match="t/x is undefined"):
        engine.evaluate("t/x", {})


def test_conflicting_values_at_run_time_are_an_evaluation_error() -> None:
    engine = loaded(rego_bundle(f"package t\n{ENTRYPOINT}x := 1 if input.a\n\nx := 2 if input.b\n"))
    assert engine.evaluate("t/x", {"a": True}).value == 1
    with pytest.raises(PolicyEvaluationError, match="t/x failed"):
        engine.evaluate("t/x", {"a": True, "b": True})
    assert engine.evaluate("t/x", {"b": True}).value == 2


def test_an_unknown_entrypoint_is_refused_with_the_known_ones() -> None:
    engine = loaded(Bundle.from_dir(SOURCES_DIR))
    with pytest.raises(UnknownEntrypoint, match=re.escape("['controlplane/settings', 'controlplane/submit'")):
        engine.evaluate("controlplane/allow", {})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"tools": {"a", "b"}}, "plain JSON"),
        (float("inf"), "plain JSON"),
        ({"tool": "\ud800"}, "plain JSON"),  # a lone surrogate has no UTF-8
        ({"n": 2**70}, "64-bit"),
    ],
)
def test_input_the_engine_cannot_represent_is_refused(value: object, message: str) -> None:
    engine = loaded(Bundle.from_dir(SOURCES_DIR))
    with pytest.raises(PolicyInputError, match=message):
        engine.evaluate("controlplane/submit", value)


def test_evaluating_before_loading_is_an_error() -> None:
    with pytest.raises(PolicyError, match="no policy bundle loaded"):
        RegoEngine().evaluate("controlplane/submit", {})


def test_concurrent_evaluations_do_not_mix_inputs() -> None:
    engine = loaded(rego_bundle(f"package t\n{ENTRYPOINT}echo := input\n"))
    mixed: list[object] = []

    def worker(number: int) -> None:
        for round_ in range(50):
            value = engine.evaluate("t/echo", {"worker": number, "round": round_}).value
            if value != {"worker": number, "round": round_}:
                mixed.append(value)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mixed == []
