"""The WAT test modules: `wat/runtime.wat` (the OPA ABI surface) with a policy fragment spliced in,
compiled by wasmtime. Knobs change what a module declares (ABI version, memory limits, exports,
imports, builtins) so the host's handling of each can be tested."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import wasmtime

from policies_wasm.engine import Bundle

WAT_DIR = Path(__file__).parent / "wat"
PAGE_SIZE = 65536

ENTRYPOINTS: dict[str, list[str]] = {
    "echo": ["test/echo", "test/data", "test/undefined"],
    "builtins": [
        "test/sprintf",
        "test/is_valid",
        "test/answer",
        "test/triple",
        "test/sum4",
        "test/nothing",
        "test/unlisted",
    ],
    "grow": ["test/allocate"],
    "faults": ["test/abort", "test/trap", "test/loop", "test/println", "test/bad_json", "test/recurse"],
    "high_data": ["test/static"],
}
# The ids builtins.wat calls; the host must map them back to names through builtins().
BUILTIN_IDS = {
    "custom.sum4": 1,
    "custom.nothing": 2,
    "json.is_valid": 3,
    "custom.triple": 5,
    "sprintf": 7,
    "custom.answer": 9,
}


def static_value(address: int, text: str) -> str:
    """A data segment holding a runtime value ([i32 length][JSON bytes]) at `address`."""
    raw = text.encode()
    escaped = "".join(f"\\{byte:02x}" for byte in len(raw).to_bytes(4, "little") + raw)
    return f'(data (i32.const {address}) "{escaped}")'


def module_wat(
    policy: str,
    *,
    memory: str = "2",
    abi_major: int = 1,
    abi_minor: int = 2,
    heap_base: int = 16384,
    export_opa_eval: bool | None = None,
    builtins: dict[str, int] | None = None,
    builtins_json: str | None = None,
    entrypoints_json: str | None = None,
    extra_imports: str = "",
) -> str:
    """The module for fragment `policy` (a file name in wat/ without .wat)."""
    if builtins is None:
        builtins = BUILTIN_IDS if policy == "builtins" else {}
    if export_opa_eval is None:
        export_opa_eval = abi_minor >= 2
    if entrypoints_json is None:
        entrypoints_json = json.dumps({name: index for index, name in enumerate(ENTRYPOINTS[policy])})
    replacements = {
        "{{MEMORY}}": memory,
        "{{ABI_MAJOR}}": str(abi_major),
        "{{ABI_MINOR}}": str(abi_minor),
        "{{HEAP_BASE}}": str(heap_base),
        "{{BUILTINS}}": static_value(1024, builtins_json if builtins_json is not None else json.dumps(builtins)),
        "{{ENTRYPOINTS}}": static_value(2048, entrypoints_json),
        "{{OPA_EVAL_EXPORT}}": '(export "opa_eval" (func $opa_eval))' if export_opa_eval else "",
        "{{EXTRA_IMPORTS}}": extra_imports,
        "{{POLICY}}": (WAT_DIR / f"{policy}.wat").read_text(),
    }
    text = (WAT_DIR / "runtime.wat").read_text()
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text


def module_bytes(policy: str, **knobs: Any) -> bytes:
    return wasmtime.wat2wasm(module_wat(policy, **knobs))


def wasm_bundle(policy: str, data: dict[str, Any] | None = None, **knobs: Any) -> Bundle:
    return Bundle(modules={}, data=data or {}, wasm=module_bytes(policy, **knobs), origin=f"wat/{policy}.wat")


def stub_bytes(
    *,
    result: str = "(i32.const 16)",
    start: str = "",
    malloc_signature: str = "(param i32) (result i32)",
    extra_imports: str = "",
) -> bytes:
    """wat/stub.wat: `result` is opa_eval's body, `start` e.g. "(start $spin)"."""
    text = (WAT_DIR / "stub.wat").read_text()
    for placeholder, value in {
        "{{RESULT}}": result,
        "{{START}}": start,
        "{{MALLOC_SIGNATURE}}": malloc_signature,
        "{{EXTRA_IMPORTS}}": extra_imports,
    }.items():
        text = text.replace(placeholder, value)
    return wasmtime.wat2wasm(text)
