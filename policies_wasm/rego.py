"""The Rego engine on regopy (Microsoft's rego-cpp, Rego v1): evaluates the Rego sources directly, the
default on machines without the `opa` CLI to compile them to wasm.

Loading compiles the bundle once into a rego-cpp bundle (plans for every declared entrypoint, with
the data); each evaluation sets the input and runs one plan. The per-evaluation path calls the C API
through regopy's ctypes bindings (`regopy.rego_shared`) directly: regopy's `Input` passes strings
unescaped (see `_input_handle`) and its `Output` parses every result twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import regopy
from regopy import rego_shared

from policies_wasm.engine import (
    Bundle,
    Decision,
    PolicyError,
    PolicyEvaluationError,
    PolicyInputError,
    PolicyLoadError,
    PolicyUndefined,
    UnknownEntrypoint,
    canonical_json,
    sha256_digest,
)

ENGINE_NAME = "regopy"

_ERROR_MESSAGE = re.compile(r"\(errormsg \d+:(.*?)\)\n")


@dataclass(frozen=True)
class _CompiledBundle:
    digest: str
    entrypoints: frozenset[str]
    plans: regopy.Bundle
    # rego-cpp bundles may point into the interpreter that built them: keep it alive with them.
    builder: regopy.Interpreter
    runner: regopy.Interpreter


class RegoEngine:
    """Evaluates a bundle's Rego with rego-cpp. Thread-safe: evaluations are serialised per engine,
    because an interpreter holds the input between `set_input` and the query."""

    name = ENGINE_NAME

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._compiled: _CompiledBundle | None = None

    @property
    def entrypoints(self) -> frozenset[str]:
        return self._compiled.entrypoints if self._compiled is not None else frozenset()

    def load(self, bundle: Bundle) -> None:
        """Builds the bundle's plans; a bundle with the digest already loaded is not rebuilt."""
        if self._compiled is not None and self._compiled.digest == bundle.digest:
            return
        compiled = _compile(bundle)
        with self._lock:
            self._compiled = compiled

    def evaluate(self, entrypoint: str, input: Any) -> Decision:
        started = time.perf_counter()
        compiled = self._compiled
        if compiled is None:
            raise PolicyError("no policy bundle loaded: call load() first")
        if entrypoint not in compiled.entrypoints:
            raise UnknownEntrypoint(
                f"entrypoint {entrypoint!r} is not in the bundle; it has {sorted(compiled.entrypoints)}"
            )
        raw_input = canonical_json(input)
        # Built from the canonical bytes, so the engine sees exactly what the digest covers.
        value = msgspec.json.decode(raw_input)
        with self._lock:
            output = _query(compiled, entrypoint, value)
        return Decision(
            entrypoint=entrypoint,
            value=_decision_value(output, entrypoint),
            engine=ENGINE_NAME,
            bundle_digest=compiled.digest,
            input_digest=sha256_digest(raw_input),
            duration_ms=(time.perf_counter() - started) * 1000,
        )


def _compile(bundle: Bundle) -> _CompiledBundle:
    if not bundle.modules:
        raise PolicyLoadError(f"bundle {bundle.origin or bundle.version} has no Rego modules")
    entrypoints = bundle.entrypoints
    if not entrypoints:
        raise PolicyLoadError(
            f"bundle {bundle.origin or bundle.version} declares no entrypoints: mark the decision rules "
            "with a `# METADATA` block holding `# entrypoint: true`"
        )
    builder = _quiet_interpreter()
    try:
        _add_sources(builder, bundle)
        plans = builder.build(None, list(entrypoints))
    except regopy.RegoError as exc:
        raise PolicyLoadError(_compile_failure(bundle, str(exc))) from None
    if not plans.ok():
        raise PolicyLoadError(_compile_failure(bundle, ""))
    return _CompiledBundle(
        digest=bundle.digest,
        entrypoints=frozenset(entrypoints),
        plans=plans,
        builder=builder,
        runner=_quiet_interpreter(),
    )


def _quiet_interpreter() -> regopy.Interpreter:
    # rego-cpp prints diagnostics on the process's stdout at the default level; errors are
    # collected and raised instead.
    interpreter = regopy.Interpreter()
    interpreter.log_level = regopy.LogLevel.NONE
    return interpreter


def _add_sources(interpreter: regopy.Interpreter, bundle: Bundle) -> None:
    for path, source in sorted(bundle.modules.items()):
        interpreter.add_module(path, source)
    interpreter.add_data_json(canonical_json(bundle.data).decode())


def _compile_failure(bundle: Bundle, error_tree: str) -> str:
    """rego-cpp reports some compile errors only as text on stdout (a failed build raises nothing):
    compile once more with that output captured, which happens only when a bundle is broken."""
    with contextlib.suppress(regopy.RegoError), _captured_stdout() as captured:
        interpreter = regopy.Interpreter()
        interpreter.log_level = regopy.LogLevel.ERROR
        _add_sources(interpreter, bundle)
        interpreter.build(None, list(bundle.entrypoints))
    diagnostics = captured.text.strip()
    if not diagnostics:
        diagnostics = "; ".join(_ERROR_MESSAGE.findall(error_tree)) or error_tree.strip() or "no diagnostics"
    return f"Rego in bundle {bundle.origin or bundle.version} does not compile:\n{diagnostics[:4000]}"


class _Captured:
    text = ""


@contextlib.contextmanager
def _captured_stdout() -> Iterator[_Captured]:
    captured = _Captured()
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield captured
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")


def _query(compiled: _CompiledBundle, entrypoint: str, value: Any) -> str:
    runner = compiled.runner._impl
    input_handle = _input_handle(value)
    try:
        if _lib.regoSetInput(runner, input_handle) != _OK:
            raise PolicyEvaluationError(f"rego-cpp refused the input: {rego_shared.rego_get_error(runner)}")
    finally:
        _lib.regoFreeInput(input_handle)
    output = _lib.regoBundleQueryEntrypoint(runner, compiled.plans._impl, entrypoint.encode())
    if not output:
        raise PolicyEvaluationError(f"{entrypoint}: {rego_shared.rego_get_error(runner)}")
    try:
        text = rego_shared.rego_output_string(output)
        if not _lib.regoOutputOk(output):
            messages = _ERROR_MESSAGE.findall(text)
            raise PolicyEvaluationError(f"{entrypoint} failed: {'; '.join(messages) or text.strip()}")
        return text
    finally:
        _lib.regoFreeOutput(output)


# The C functions behind regopy, with the argument types regopy declared on import.
_lib = rego_shared.rego
_OK = 0
_INT64 = range(-(2**63), 2**63)
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _json_escaped(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _input_handle(value: Any) -> int:
    """The input as a rego-cpp input tree. Built through the C API node by node (post-order, as
    rego-cpp expects): several times faster than having rego-cpp parse JSON text. Return codes are
    OR-ed and checked once.

    rego-cpp keeps a string as the text between its JSON quotes and compares strings by that text,
    so strings go in JSON-escaped exactly as in canonical_json (which also built the data). regopy's
    own `Input` passes them raw: a quote or backslash then breaks equality and the output JSON."""
    handle = _lib.regoNewInput()
    status = 0

    def add(item: Any) -> None:
        nonlocal status
        kind = type(item)
        if kind is str:
            text = _json_escaped(item) if _NEEDS_ESCAPE.search(item) else item
            status |= _lib.regoInputString(handle, text.encode())
        elif kind is bool:
            status |= _lib.regoInputBoolean(handle, item)
        elif kind is int:
            if item not in _INT64:
                raise PolicyInputError(f"rego-cpp numbers are 64-bit: {item} is out of range")
            status |= _lib.regoInputInt(handle, item)
        elif kind is float:
            status |= _lib.regoInputFloat(handle, item)
        elif item is None:
            status |= _lib.regoInputNull(handle)
        elif kind is dict:
            for key, member in item.items():
                add(key)
                add(member)
                status |= _lib.regoInputObjectItem(handle)
            status |= _lib.regoInputObject(handle, len(item))
        else:  # list: the value was decoded from JSON, so nothing else occurs
            for member in item:
                add(member)
            status |= _lib.regoInputArray(handle, len(item))

    try:
        add(value)
    except PolicyInputError:
        _lib.regoFreeInput(handle)
        raise
    if status != _OK:
        _lib.regoFreeInput(handle)
        raise PolicyEvaluationError("rego-cpp could not build the input document")
    return handle


def _decision_value(output: str, entrypoint: str) -> Any:
    if output == "undefined":
        raise PolicyUndefined(f"{entrypoint} is undefined for this input")
    try:
        result = msgspec.json.decode(output)
        return result["expressions"][0]
    except (msgspec.DecodeError, KeyError, IndexError, TypeError):
        raise PolicyEvaluationError(f"{entrypoint}: unexpected rego-cpp output {output[:200]!r}") from None
