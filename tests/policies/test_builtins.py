"""The host's built-ins. `sprintf` matters most: compiled policies call it on the host, regopy runs
rego-cpp's own, and decisions (their reasons) must read the same on both engines."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies_wasm.builtins import HOST_BUILTINS, json_is_valid, regex_split, sprintf
from policies_wasm.engine import Bundle
from policies_wasm.rego import RegoEngine


@pytest.mark.parametrize(
    ("format", "values", "expected"),
    [
        ("%v|%s|%d", [12.5, "s", 3], "12.5|s|3"),
        ("%v %v %v", [True, None, ["a", 1]], 'true null ["a", 1]'),
        ("%v", [{"k": 1}], '{"k": 1}'),
        ("%v %v %v %v %v", [10.0, 1e6, 1234567.5, 0.0001, 1e-05], "10 1e+06 1.2345675e+06 0.0001 1e-05"),
        ("%.2f|%5d|%-5s|%05d|%+d", [2.5, 42, "ab", 42, 3], "2.50|   42|ab   |00042|+3"),
        ("%q %x %X", ['q"', 255, "hi"], '"q\\"" ff 6869'),
        ("100%% sure", [], "100% sure"),
        ("%.3s", ["abcdef"], "abc"),
    ],
)
def test_sprintf_formats_like_go(format: str, values: list[Any], expected: str) -> None:
    assert sprintf(format, values) == expected


@pytest.mark.parametrize(
    ("format", "values", "expected"),
    [
        ("%d", [2.5], "%!d(float64=2.5)"),
        ("%s", [2.5], "%!s(float64=2.5)"),
        ("%t", [True], "%!t(string=true)"),
        ("%s %s", ["a"], "a %!s(MISSING)"),
        ("%s", ["a", "b", 3], "a%!(EXTRA string=b, int=3)"),
    ],
)
def test_sprintf_reports_misfits_like_go(format: str, values: list[Any], expected: str) -> None:
    assert sprintf(format, values) == expected


def test_sprintf_refuses_bad_operands() -> None:
    with pytest.raises(TypeError, match="operand 2 must be an array"):
        sprintf("%s", "a")
    with pytest.raises(TypeError, match="operand 1 must be a string"):
        sprintf(1, [])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rego_cpp() -> RegoEngine:
    engine = RegoEngine()
    engine.load(
        Bundle(
            modules={"t.rego": "package t\n# METADATA\n# entrypoint: true\nx := sprintf(input.format, input.values)\n"}
        )
    )
    return engine


def rego_cpp_sprintf(engine: RegoEngine, format: str, values: list[Any]) -> Any:
    return engine.evaluate("t/x", {"format": format, "values": values}).value


scalars = st.one_of(
    st.integers(min_value=-(10**9), max_value=10**9),
    # Floats that print the same everywhere: exact in binary, short, below 1e6 (where Go switches
    # to exponent form). rego-cpp prints other fractions imprecisely (9.45 as 9.449999999999999),
    # so the shipped policies never quote an input's float.
    st.integers(min_value=-(10**5), max_value=10**5).map(lambda quarters: quarters / 4),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    st.booleans(),
    st.none(),
)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(scalars, min_size=1, max_size=4), data=st.data())
def test_host_sprintf_agrees_with_rego_cpp_on_the_verbs_policies_use(
    rego_cpp: RegoEngine, values: list[Any], data: st.DataObject
) -> None:
    # %v for anything, %s for anything but numbers: OPA formats %s of a number the Go way
    # (%!s(int=3)) where rego-cpp prints 3, so policies use %v for numbers.
    verbs = [
        "%v"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else data.draw(st.sampled_from(["%v", "%s"]))
        for value in values
    ]
    format = " / ".join(verbs)
    assert sprintf(format, values) == rego_cpp_sprintf(rego_cpp, format, values)


def test_s_of_a_number_is_a_misfit_in_go_as_in_opa(rego_cpp: RegoEngine) -> None:
    assert sprintf("%s", [3]) == "%!s(int=3)"
    assert rego_cpp_sprintf(rego_cpp, "%s", [3]) == "3"  # rego-cpp differs: policies format numbers with %v


def test_json_is_valid() -> None:
    assert json_is_valid('{"a": [1]}')
    assert not json_is_valid("{a}")
    assert not json_is_valid(3)


def test_regex_split() -> None:
    assert regex_split(r"\s*,\s*", "a , b,c") == ["a", "b", "c"]


def test_the_host_provides_the_common_builtins_opa_leaves_to_it() -> None:
    assert {"sprintf", "time.now_ns", "json.is_valid", "regex.split", "trace"} <= set(HOST_BUILTINS)
    assert isinstance(HOST_BUILTINS["time.now_ns"](), int)
    assert HOST_BUILTINS["trace"]("note") is True
