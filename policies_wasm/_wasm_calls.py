"""Calling wasm exports that take and return i32s, fast.

wasmtime-py's `Func.__call__` rebuilds the function's type and converts every argument on every
call: about 100 µs, ten times the call itself. An OPA evaluation makes one call on ABI 1.2 but a
dozen on older modules, plus several per host built-in. `RawExport` calls the C API's
`wasmtime_func_call_unchecked` with a preallocated array instead. "Unchecked" means wasmtime trusts
the caller about the signature, so the export's type must have been checked against the expected
one first (opa_wasm does, at load).

This reaches into wasmtime-py internals (`_ffi`, `_func.LAST_EXCEPTION`, `Trap._from_ptr`,
`Store._context`); tests/policies exercise every path, so an upgrade that moves them fails there.
"""

from __future__ import annotations

import ctypes

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import _func


def signature_text(kind: wasmtime.FuncType) -> str:
    """A function type as text, e.g. "(i32, i32) -> (i32)"."""
    return f"({', '.join(map(str, kind.params))}) -> ({', '.join(map(str, kind.results))})"


def i32_signature_text(parameters: int, results: int) -> str:
    return f"({', '.join(['i32'] * parameters)}) -> ({', '.join(['i32'] * results)})"


class RawExport:
    """An exported function whose type was checked to be `signature` (i32 parameters, i32 results);
    calling it returns its result as an unsigned 32-bit int (0 when it returns nothing) and raises
    wasmtime.Trap or WasmtimeError. Not re-entrant: the argument array is reused."""

    __slots__ = ("_context", "_func", "_length", "_values")

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, signature: tuple[int, int]) -> None:
        self._context = store._context()
        self._func = ctypes.byref(func._func)
        self._length = max(signature)
        self._values = (ffi.wasmtime_val_raw_t * max(self._length, 1))()

    def __call__(self, *arguments: int) -> int:
        values = self._values
        for index, argument in enumerate(arguments):
            values[index].i32 = argument
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_func_call_unchecked(self._context, self._func, values, self._length, ctypes.byref(trap))
        # A host function that raised left its exception in wasmtime-py's process-wide slot, where
        # it would surface in some later, unrelated call. opa_wasm keeps the real error itself.
        _func.LAST_EXCEPTION = None
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        if trap:
            raise wasmtime.Trap._from_ptr(trap)
        return values[0].i32 & 0xFFFFFFFF
