"""The OPA-wasm host against modules written to OPA's wasm ABI (tests/policies/wat): memory sizing and
growth, both evaluation paths, built-in dispatch, and every way a module can be malformed or
misbehave: each ends in a PolicyError with a clear message, never a crash or a hang."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies_wasm.builtins import UNDEFINED
from policies_wasm.engine import (
    Bundle,
    PolicyError,
    PolicyEvaluationError,
    PolicyInputError,
    PolicyLoadError,
    PolicyTimeout,
    PolicyUndefined,
    UnknownEntrypoint,
    canonical_json,
    sha256_digest,
)
from policies_wasm.opa_wasm import PAGE_SIZE, OpaWasmEngine
from tests.policies.wat_modules import BUILTIN_IDS, module_bytes, stub_bytes, wasm_bundle

CUSTOM_BUILTINS = {
    "custom.answer": lambda: 42,
    "custom.triple": lambda a, b, c: [a, b, c],
    "custom.sum4": lambda a, b, c, d: a + b + c + d,
    "custom.nothing": lambda _: UNDEFINED,
}


def loaded(bundle: Bundle, **options: Any) -> OpaWasmEngine:
    engine = OpaWasmEngine(**options)
    engine.load(bundle)
    return engine


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["abi-1.1-eval", "abi-1.2-opa_eval", "abi-1.3-opa_eval"])
def echo(request: pytest.FixtureRequest) -> OpaWasmEngine:
    return loaded(wasm_bundle("echo", data={"region": "eu", "limits": [1, 2]}, abi_minor=request.param))


@pytest.fixture(scope="module")
def builtins_engine() -> OpaWasmEngine:
    return loaded(wasm_bundle("builtins"), builtins=CUSTOM_BUILTINS)


@pytest.fixture(scope="module")
def faults() -> OpaWasmEngine:
    return loaded(wasm_bundle("faults"))


# --- Evaluation paths -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_any_json_input_reaches_the_policy_unchanged(echo: OpaWasmEngine, value: Any) -> None:
    assert echo.evaluate("test/echo", value).value == json.loads(canonical_json(value))


def test_old_modules_are_evaluated_through_the_context_api(echo: OpaWasmEngine) -> None:
    # The ABI 1.1 module exports no opa_eval: evaluating at all proves the classic path was taken.
    assert echo.abi_version[0] == 1
    assert echo.evaluate("test/echo", {"path": echo.abi_version[1]}).value == {"path": echo.abi_version[1]}


def test_the_data_document_is_loaded_once_and_visible(echo: OpaWasmEngine) -> None:
    assert echo.evaluate("test/data", None).value == {"limits": [1, 2], "region": "eu"}
    assert echo.evaluate("test/data", {"other": "input"}).value == {"limits": [1, 2], "region": "eu"}


def test_an_empty_result_set_is_undefined(echo: OpaWasmEngine) -> None:
    with pytest.raises(PolicyUndefined, match="test/undefined is undefined"):
        echo.evaluate("test/undefined", {})


def test_an_unknown_entrypoint_is_refused_with_the_known_ones(echo: OpaWasmEngine) -> None:
    with pytest.raises(UnknownEntrypoint, match=r"test/nope.*test/data.*test/echo"):
        echo.evaluate("test/nope", {})


def test_input_that_is_not_json_is_refused_before_the_module_sees_it(echo: OpaWasmEngine) -> None:
    for bad in ({"a": {1, 2}}, float("nan"), {"when": time}):
        with pytest.raises(PolicyInputError, match="plain JSON"):
            echo.evaluate("test/echo", bad)


def test_a_decision_records_engine_bundle_and_input() -> None:
    bundle = wasm_bundle("echo", data={"x": 1})
    decision = loaded(bundle).evaluate("test/echo", {"b": 1, "a": 2})
    assert decision.engine == "opa-wasm"
    assert decision.bundle_digest == bundle.digest
    assert decision.input_digest == sha256_digest(b'{"a":2,"b":1}')
    assert decision.value == {"a": 2, "b": 1}
    assert 0 < decision.duration_ms < 1000


def test_evaluating_before_loading_is_an_error() -> None:
    with pytest.raises(PolicyError, match="no policy bundle loaded"):
        OpaWasmEngine().evaluate("test/echo", {})


def test_concurrent_evaluations_do_not_mix_inputs(echo: OpaWasmEngine) -> None:
    mixed: list[tuple[int, Any]] = []

    def worker(number: int) -> None:
        for round_ in range(50):
            value = echo.evaluate("test/echo", {"worker": number, "round": round_}).value
            if value != {"worker": number, "round": round_}:
                mixed.append((number, value))

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mixed == []


# --- Memory -----------------------------------------------------------------------------------------


def test_memory_is_sized_from_the_modules_own_import() -> None:
    # The module asks for 5 pages and has data on page 4: a 2-page memory could not even be linked.
    engine = loaded(wasm_bundle("high_data", memory="5", heap_base=4 * PAGE_SIZE + 4096))
    assert engine.memory_bytes == 5 * PAGE_SIZE
    assert engine.evaluate("test/static", None).value == {"from": "page 4"}


@pytest.mark.parametrize("abi_minor", [1, 2])
def test_the_host_grows_memory_for_an_input_larger_than_it(abi_minor: int) -> None:
    engine = loaded(wasm_bundle("echo", abi_minor=abi_minor))
    before = engine.memory_bytes
    large = {"blob": "x" * (3 * PAGE_SIZE)}
    assert engine.evaluate("test/echo", large).value == large
    assert engine.memory_bytes > before + 3 * PAGE_SIZE


def test_the_module_grows_memory_when_it_allocates() -> None:
    engine = loaded(wasm_bundle("grow"))
    assert engine.memory_bytes == 2 * PAGE_SIZE
    assert engine.evaluate("test/allocate", 1024).value == 1024  # 1 MiB
    assert engine.memory_bytes == 17 * PAGE_SIZE  # the heap starts at 16 KiB: 1 MiB more ends in page 17


def test_the_heap_is_reset_between_evaluations() -> None:
    engine = loaded(wasm_bundle("grow"))
    engine.evaluate("test/allocate", 256)
    after_one = engine.memory_bytes
    for _ in range(50):
        engine.evaluate("test/allocate", 256)
    assert engine.memory_bytes == after_one


def test_running_out_of_the_modules_declared_maximum_is_an_error_and_the_engine_recovers() -> None:
    engine = loaded(wasm_bundle("grow", memory="2 8"))
    with pytest.raises(PolicyEvaluationError, match="opa_malloc: out of memory"):
        engine.evaluate("test/allocate", 1024)  # 1 MiB > 8 pages
    assert engine.evaluate("test/allocate", 16).value == 16


def test_an_input_beyond_the_memory_limit_is_refused_clearly() -> None:
    engine = loaded(wasm_bundle("echo"), max_memory_bytes=8 * PAGE_SIZE)
    with pytest.raises(PolicyEvaluationError, match="does not fit in the policy's memory"):
        engine.evaluate("test/echo", "x" * (10 * PAGE_SIZE))
    assert engine.evaluate("test/echo", "small").value == "small"


def test_a_module_needing_more_memory_than_allowed_is_refused_at_load() -> None:
    with pytest.raises(PolicyLoadError, match="needs 64 pages of memory, more than the limit of 16"):
        loaded(wasm_bundle("echo", memory="64"), max_memory_bytes=16 * PAGE_SIZE)


# --- Built-ins --------------------------------------------------------------------------------------


def test_sprintf_runs_on_the_host(builtins_engine: OpaWasmEngine) -> None:
    assert builtins_engine.evaluate("test/sprintf", ["ada", 3]).value == "ada scored 3"


@pytest.mark.parametrize(
    ("entrypoint", "input", "expected"),
    [
        ("test/answer", None, 42),  # opa_builtin0
        ("test/is_valid", '{"a": 1}', True),  # opa_builtin1
        ("test/is_valid", "{a: 1}", False),
        ("test/triple", "x", ["x", "x", "x"]),  # opa_builtin3
        ("test/sum4", 2.5, 10),  # opa_builtin4
    ],
)
def test_every_builtin_arity_is_dispatched(
    builtins_engine: OpaWasmEngine, entrypoint: str, input: Any, expected: Any
) -> None:
    assert builtins_engine.evaluate(entrypoint, input).value == expected


def test_builtins_are_dispatched_by_the_ids_the_module_assigned() -> None:
    # Same code, other id table: if the host dispatched by position or name order, the answers
    # would change. Swap the ids of sprintf (7) and custom.answer (9) in the table only.
    swapped = {**BUILTIN_IDS, "sprintf": 9, "custom.answer": 7}
    engine = loaded(wasm_bundle("builtins", builtins=swapped), builtins=CUSTOM_BUILTINS)
    # The module calls id 7 with two arguments, which now names custom.answer (which takes none).
    with pytest.raises(PolicyEvaluationError, match=re.escape("custom.answer failed")):
        engine.evaluate("test/sprintf", ["ada", 3])
    with pytest.raises(PolicyEvaluationError, match=re.escape("sprintf failed")):
        engine.evaluate("test/answer", None)


def test_a_builtin_returning_undefined_leaves_the_decision_undefined(builtins_engine: OpaWasmEngine) -> None:
    with pytest.raises(PolicyUndefined):
        builtins_engine.evaluate("test/nothing", 1)


def test_a_builtin_id_the_module_did_not_list_is_an_error(builtins_engine: OpaWasmEngine) -> None:
    with pytest.raises(PolicyEvaluationError, match="built-in id 42, which its builtins\\(\\) does not list"):
        builtins_engine.evaluate("test/unlisted", 1)


def test_a_failing_builtin_is_an_error_and_the_engine_recovers(builtins_engine: OpaWasmEngine) -> None:
    with pytest.raises(PolicyEvaluationError, match="sprintf failed: sprintf: operand 2 must be an array"):
        builtins_engine.evaluate("test/sprintf", "not a list")
    assert builtins_engine.evaluate("test/sprintf", ["bo", 4]).value == "bo scored 4"


def test_a_module_needing_builtins_the_host_lacks_is_refused_at_load() -> None:
    with pytest.raises(
        PolicyLoadError, match=re.escape("does not provide: custom.answer, custom.nothing, custom.sum4")
    ):
        loaded(wasm_bundle("builtins"))
    with pytest.raises(PolicyLoadError, match=re.escape("http.send")):
        loaded(wasm_bundle("echo", builtins={"http.send": 0}))


# --- Misbehaving modules ----------------------------------------------------------------------------


def test_an_abort_carries_the_modules_message(faults: OpaWasmEngine) -> None:
    with pytest.raises(PolicyEvaluationError, match="the policy aborted: policy gave up: the answer is not 42"):
        faults.evaluate("test/abort", {})


@pytest.mark.parametrize(("entrypoint", "reason"), [("test/trap", "unreachable"), ("test/recurse", "stack overflow")])
def test_a_trap_is_an_error(faults: OpaWasmEngine, entrypoint: str, reason: str) -> None:
    with pytest.raises(PolicyEvaluationError, match=f"trapped in opa_eval: {reason}"):
        faults.evaluate(entrypoint, {})


def test_a_module_that_never_returns_is_stopped() -> None:
    engine = loaded(wasm_bundle("faults"), fuel=5_000_000)
    started = time.monotonic()
    with pytest.raises(PolicyTimeout, match="budget of 5000000 wasm instructions"):
        engine.evaluate("test/loop", {})
    assert time.monotonic() - started < 5


def test_print_goes_to_the_log(faults: OpaWasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="policies_wasm.opa_wasm"):
        assert faults.evaluate("test/println", {"a": 1}).value == {"a": 1}
    assert "policy print: hello from the policy" in caplog.text


def test_a_result_that_is_not_json_is_an_error(faults: OpaWasmEngine) -> None:
    with pytest.raises(PolicyEvaluationError, match="invalid JSON"):
        faults.evaluate("test/bad_json", {})


def test_the_engine_recovers_after_every_fault(faults: OpaWasmEngine) -> None:
    for entrypoint in ("test/abort", "test/trap", "test/recurse", "test/bad_json"):
        with pytest.raises(PolicyEvaluationError):
            faults.evaluate(entrypoint, {})
        assert faults.evaluate("test/println", [entrypoint]).value == [entrypoint]


# --- Malformed modules ------------------------------------------------------------------------------

WASI_IMPORT = '(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'


@pytest.mark.parametrize(
    ("wasm", "message"),
    [
        pytest.param(b"not wasm at all", "is not a valid wasm module", id="not-wasm"),
        pytest.param(module_bytes("echo")[:40], "is not a valid wasm module", id="truncated"),
        pytest.param(
            module_bytes("echo").replace(b"opa_wasm_abi_version", b"xxx_wasm_abi_version"),
            "not an OPA policy module: it exports no opa_wasm_abi_version",
            id="no-abi-version",
        ),
        pytest.param(module_bytes("echo", abi_major=2), "unsupported OPA wasm ABI 2.2", id="abi-2"),
        pytest.param(
            module_bytes("echo", abi_minor=2, export_opa_eval=False), "lacks exports \\['opa_eval'\\]", id="no-opa_eval"
        ),
        pytest.param(
            stub_bytes(malloc_signature="(param i64) (result i32)"),
            "exports opa_malloc as \\(i64\\) -> \\(i32\\); the ABI has \\(i32\\) -> \\(i32\\)",
            id="export-signature",
        ),
        pytest.param(
            stub_bytes(extra_imports=WASI_IMPORT),
            "imports wasi_snapshot_preview1.fd_write, which the OPA wasm ABI does not provide",
            id="foreign-import",
        ),
        pytest.param(
            module_bytes("echo", extra_imports='(import "env" "opa_frobnicate" (func (param i32)))'),
            "imports env.opa_frobnicate",
            id="unknown-env-import",
        ),
        pytest.param(
            stub_bytes(extra_imports='(import "env" "opa_abort" (func (param i64)))'),
            "imports env.opa_abort as \\(i64\\) -> \\(\\); the ABI has \\(i32\\) -> \\(\\)",
            id="import-signature",
        ),
        pytest.param(
            module_bytes("echo", builtins_json="[1, 2]"), "builtins\\(\\) must map names to ids", id="builtins"
        ),
        pytest.param(
            module_bytes("echo", entrypoints_json='{"test/echo": "zero"}'),
            "entrypoints\\(\\) must map names to ids",
            id="entrypoints",
        ),
        pytest.param(
            stub_bytes(start="(start $boom)"), "cannot instantiate the policy module: unreachable", id="start-trap"
        ),
        pytest.param(stub_bytes(start="(start $spin)"), "start function ran out of fuel", id="start-loop"),
    ],
)
def test_a_malformed_module_is_refused_at_load_with_the_reason(wasm: bytes, message: str) -> None:
    with pytest.raises(PolicyLoadError, match=message):
        loaded(Bundle(modules={}, wasm=wasm), fuel=5_000_000)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ("(i32.const 0x7ffffff0)", "returned address 2147483632, outside the 65536-byte memory"),
        ("(i32.const 0)", "returned address 0"),
        ("(i32.const 65530)", "runs off the end of memory \\(no NUL\\)"),
        ("(i32.const 48)", "expected a result set"),
    ],
)
def test_a_bad_result_address_is_an_error_not_a_crash(result: str, message: str) -> None:
    engine = loaded(Bundle(modules={}, wasm=stub_bytes(result=result)))
    with pytest.raises(PolicyEvaluationError, match=message):
        engine.evaluate("test/x", {})


def test_a_failed_load_keeps_the_bundle_loaded_before() -> None:
    engine = loaded(wasm_bundle("echo"))
    with pytest.raises(PolicyLoadError):
        engine.load(Bundle(modules={}, wasm=b"garbage"))
    assert engine.evaluate("test/echo", 7).value == 7


def test_a_bundle_without_wasm_is_refused() -> None:
    with pytest.raises(PolicyLoadError, match=re.escape("has no policy.wasm; use the regopy engine")):
        OpaWasmEngine().load(Bundle(modules={"a.rego": "package a\n"}))
