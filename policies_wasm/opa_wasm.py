"""OPA policies compiled to WebAssembly (`opa build -t wasm`), evaluated on wasmtime.

This is the host side of OPA's wasm ABI 1.x, written from its documentation
(https://www.openpolicyagent.org/docs/wasm):

- The module imports `env.memory`; the host creates it with the limits the module's own import
  declares (OPA sizes that minimum from its data segments, often more than 2 pages).
- Imports `env.opa_abort`, `env.opa_println` and `env.opa_builtin0..4` are provided; a built-in
  the module asks for is dispatched by the id its `builtins()` export assigned to the name, to the
  Python implementations in `policies_wasm.builtins` (or ones the caller adds). A module that needs
  a built-in the host lacks is refused at load, not at its first decision.
- ABI >= 1.2 is evaluated with the one-call `opa_eval` (input written after the data on the heap);
  older modules with `opa_eval_ctx_*` + `eval`. Either way the heap pointer is reset before each
  evaluation, so memory does not creep.
- Every evaluation runs on a fuel budget (wasm instructions), so a looping module ends with
  PolicyTimeout instead of hanging the process; memory is capped by the store's limits. An
  evaluation given a `timeout` is also stopped at that wall-clock deadline, by epoch interruption
  (a watchdog thread bumps the engine's epoch; the module traps at its next loop or call), so it
  stops burning the core it runs on. After any failure the instance is rebuilt from the compiled
  module before the next evaluation.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import msgspec
import wasmtime

from policies_wasm._wasm_calls import RawExport, i32_signature_text, signature_text
from policies_wasm.builtins import HOST_BUILTINS, UNDEFINED, HostBuiltin
from policies_wasm.engine import (
    Bundle,
    Decision,
    PolicyError,
    PolicyEvaluationError,
    PolicyLoadError,
    PolicyTimeout,
    PolicyUndefined,
    UnknownEntrypoint,
    canonical_json,
    sha256_digest,
)
from policies_wasm.watchdog import Watchdog

log = logging.getLogger(__name__)

ENGINE_NAME = "opa-wasm"
PAGE_SIZE = 65536
# Wasm instructions per evaluation: far more than policies like the shipped ones need, and a
# runaway module stops within ~0.2 s.
DEFAULT_FUEL = 50_000_000
DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
# Epoch deadline of an evaluation without a timeout: never reached (the epoch only moves on timeouts).
_NO_EPOCH_DEADLINE = 2**62

_I32 = wasmtime.ValType.i32()
# name -> number of i32 parameters, number of i32 results
_HOST_FUNCTIONS: dict[str, tuple[int, int]] = {
    "opa_abort": (1, 0),
    "opa_println": (1, 0),
    "opa_builtin0": (2, 1),
    "opa_builtin1": (3, 1),
    "opa_builtin2": (4, 1),
    "opa_builtin3": (5, 1),
    "opa_builtin4": (6, 1),
}
# Exports used, with their (i32 parameters, i32 results) as the ABI documents them.
_COMMON_EXPORTS = {
    "opa_malloc": (1, 1),
    "opa_free": (1, 0),
    "opa_json_parse": (2, 1),
    "opa_json_dump": (1, 1),
    "opa_heap_ptr_get": (0, 1),
    "opa_heap_ptr_set": (1, 0),
    "builtins": (0, 1),
    "entrypoints": (0, 1),
}
_FAST_EXPORTS = {"opa_eval": (7, 1)}
_CLASSIC_EXPORTS = {
    "eval": (1, 1),
    "opa_eval_ctx_new": (0, 1),
    "opa_eval_ctx_set_input": (2, 0),
    "opa_eval_ctx_set_data": (2, 0),
    "opa_eval_ctx_set_entrypoint": (2, 0),
    "opa_eval_ctx_get_result": (1, 1),
}


class OpaWasmEngine:
    """Evaluates the `policy.wasm` of a bundle. Thread-safe: evaluations are serialised per engine
    (a wasm instance has one heap). `watchdog` stops evaluations given a `timeout`; engines can share
    one (else the engine starts its own on the first timeout)."""

    name = ENGINE_NAME

    def __init__(
        self,
        *,
        fuel: int = DEFAULT_FUEL,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        builtins: Mapping[str, HostBuiltin] | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        self._wasm = wasmtime.Engine(config)
        self._watchdog = watchdog
        self._fuel = fuel
        self._max_memory_bytes = max_memory_bytes
        self._builtins = {**HOST_BUILTINS, **(builtins or {})}
        self._lock = threading.Lock()
        self._module: wasmtime.Module | None = None
        self._data_json = b"{}"
        self._bundle_digest = ""
        self._instance: _PolicyInstance | None = None

    @property
    def entrypoints(self) -> frozenset[str]:
        return frozenset(self._instance.entrypoint_ids) if self._instance is not None else frozenset()

    @property
    def abi_version(self) -> tuple[int, int]:
        return self._loaded().abi_version

    @property
    def memory_bytes(self) -> int:
        """Current size of the instance's linear memory."""
        instance = self._loaded()
        return instance.memory.data_len(instance.store)

    def load(self, bundle: Bundle) -> None:
        if bundle.wasm is None:
            raise PolicyLoadError(f"bundle {bundle.origin or bundle.version} has no policy.wasm; use the regopy engine")
        try:
            module = wasmtime.Module(self._wasm, bundle.wasm)
        except wasmtime.WasmtimeError as exc:
            raise PolicyLoadError(
                f"policy.wasm of {bundle.origin or bundle.version} is not a valid wasm module: {_first_line(exc)}"
            ) from None
        data_json = canonical_json(bundle.data)
        instance = self._instantiate(module, data_json)
        with self._lock:
            self._module, self._data_json, self._bundle_digest = module, data_json, bundle.digest
            self._instance = instance

    def evaluate(self, entrypoint: str, input: Any, *, timeout: float | None = None) -> Decision:
        """`timeout` (seconds) stops the evaluation at that wall-clock deadline with PolicyTimeout,
        as the fuel budget does after so many instructions."""
        started = time.perf_counter()
        raw_input = canonical_json(input)
        with self._lock:
            instance = self._loaded()
            entrypoint_id = instance.entrypoint_ids.get(entrypoint)
            if entrypoint_id is None:
                raise UnknownEntrypoint(
                    f"entrypoint {entrypoint!r} is not in the bundle; it has {sorted(instance.entrypoint_ids)}"
                )
            # Armed and disarmed under the lock: a late alarm can only bump the epoch before the next
            # evaluation sets its deadline relative to the epoch, so it never stops another one.
            alarm = None if timeout is None else self._watchdog_thread().arm(timeout, self._wasm.increment_epoch)
            try:
                result = instance.evaluate(entrypoint_id, raw_input, timeout)
            except BaseException:
                self._replace_instance()
                raise
            finally:
                if alarm is not None:
                    alarm.disarm()
            bundle_digest = self._bundle_digest
        return Decision(
            entrypoint=entrypoint,
            value=_decision_value(result, entrypoint),
            engine=ENGINE_NAME,
            bundle_digest=bundle_digest,
            input_digest=sha256_digest(raw_input),
            duration_ms=(time.perf_counter() - started) * 1000,
        )

    def _watchdog_thread(self) -> Watchdog:
        if self._watchdog is None:
            self._watchdog = Watchdog("opa-wasm-watchdog")
        return self._watchdog

    def _loaded(self) -> _PolicyInstance:
        if self._instance is None:
            raise PolicyError("no policy bundle loaded: call load() first")
        return self._instance

    def _instantiate(self, module: wasmtime.Module, data_json: bytes) -> _PolicyInstance:
        return _PolicyInstance(self._wasm, module, data_json, self._builtins, self._fuel, self._max_memory_bytes)

    def _replace_instance(self) -> None:
        # A failed evaluation can leave the module's heap and globals half-updated.
        assert self._module is not None
        try:
            self._instance = self._instantiate(self._module, self._data_json)
        except PolicyError:
            log.exception("could not re-instantiate the policy module after a failed evaluation")
            self._instance = None


class _HostFailure(Exception):
    """Raised inside a host function to stop the wasm call; the real error is on the instance."""


class _PolicyInstance:
    """One instantiated module with its store, memory, data document and id tables."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        module: wasmtime.Module,
        data_json: bytes,
        builtins: Mapping[str, HostBuiltin],
        fuel: int,
        max_memory_bytes: int,
    ) -> None:
        self.store = wasmtime.Store(engine)
        self.store.set_limits(memory_size=max_memory_bytes)
        self._fuel = fuel
        self._max_memory_bytes = max_memory_bytes
        self._builtins = builtins
        self._builtin_names: dict[int, str] = {}
        self._failure: PolicyError | None = None
        self._timeout: float | None = None
        self.store.set_epoch_deadline(_NO_EPOCH_DEADLINE)

        linker = wasmtime.Linker(engine)
        imported_memory = self._define_imports(linker, module)
        self.store.set_fuel(fuel)  # the start function and data segments run on it too
        try:
            instance = linker.instantiate(self.store, module)
        except Exception as exc:
            if self._failure is not None:
                raise PolicyLoadError(f"the policy module failed while starting: {self._failure}") from None
            if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                raise PolicyLoadError("the policy module's start function ran out of fuel") from None
            raise PolicyLoadError(f"cannot instantiate the policy module: {_trap_reason(exc)}") from None
        exports = instance.exports(self.store)
        self.abi_version = self._abi_version(exports)
        exported_memory = exports.get("memory")
        memory = exported_memory if isinstance(exported_memory, wasmtime.Memory) else imported_memory
        if memory is None:
            raise PolicyLoadError("the policy module neither imports env.memory nor exports a memory")
        self.memory = memory

        self._fast = self.abi_version[1] >= 2
        self._functions = self._bind_exports(
            exports, {**_COMMON_EXPORTS, **(_FAST_EXPORTS if self._fast else _CLASSIC_EXPORTS)}
        )

        try:
            self._call("opa_malloc", 0)  # as OPA's own SDK does: initialises the heap
            self._builtin_names = self._builtin_table(self._dump_json(self._call("builtins"), free=True))
            self.entrypoint_ids = self._entrypoint_table(self._dump_json(self._call("entrypoints"), free=True))
            self._data_address = self._parse_json(data_json, what="the data document", free=True)
            self._eval_heap_pointer = self._call("opa_heap_ptr_get")
        except PolicyLoadError:
            raise
        except PolicyError as exc:
            raise PolicyLoadError(f"the policy module failed while loading: {exc}") from None

    # --- Instantiation ------------------------------------------------------------------------------

    def _define_imports(self, linker: wasmtime.Linker, module: wasmtime.Module) -> wasmtime.Memory | None:
        memory = None
        for item in module.imports:
            kind = item.type
            if (item.module, item.name) == ("env", "memory") and isinstance(kind, wasmtime.MemoryType):
                limits = kind.limits
                if kind.is_64 or kind.is_shared:
                    raise PolicyLoadError(
                        "the policy module imports a 64-bit or shared memory; OPA modules use neither"
                    )
                if limits.min * PAGE_SIZE > self._max_memory_bytes:
                    raise PolicyLoadError(
                        f"the policy module needs {limits.min} pages of memory, more than the limit of "
                        f"{self._max_memory_bytes // PAGE_SIZE} pages"
                    )
                memory = wasmtime.Memory(self.store, wasmtime.MemoryType(wasmtime.Limits(limits.min, limits.max)))
                linker.define(self.store, "env", "memory", memory)
            elif item.module == "env" and item.name in _HOST_FUNCTIONS and isinstance(kind, wasmtime.FuncType):
                params, results = _HOST_FUNCTIONS[item.name]
                actual, expected = signature_text(kind), i32_signature_text(params, results)
                if actual != expected:
                    raise PolicyLoadError(
                        f"the policy module imports env.{item.name} as {actual}; the ABI has {expected}"
                    )
                signature = wasmtime.FuncType([_I32] * params, [_I32] * results)
                linker.define(
                    self.store, "env", item.name, wasmtime.Func(self.store, signature, self._host_function(item.name))
                )
            else:
                raise PolicyLoadError(
                    f"the policy module imports {item.module}.{item.name}, which the OPA wasm ABI does not provide"
                )
        return memory

    def _bind_exports(
        self, exports: Mapping[str, Any], required: Mapping[str, tuple[int, int]]
    ) -> dict[str, RawExport]:
        version = f"ABI {self.abi_version[0]}.{self.abi_version[1]}"
        missing = [name for name in required if not isinstance(exports.get(name), wasmtime.Func)]
        if missing:
            raise PolicyLoadError(f"the policy module ({version}) lacks exports {missing}")
        functions = {}
        for name, signature in required.items():
            actual, expected = signature_text(exports[name].type(self.store)), i32_signature_text(*signature)
            if actual != expected:
                raise PolicyLoadError(
                    f"the policy module ({version}) exports {name} as {actual}; the ABI has {expected}"
                )
            functions[name] = RawExport(self.store, exports[name], signature)
        return functions

    def _abi_version(self, exports: Mapping[str, Any]) -> tuple[int, int]:
        major_global = exports.get("opa_wasm_abi_version")
        if not isinstance(major_global, wasmtime.Global):
            raise PolicyLoadError("not an OPA policy module: it exports no opa_wasm_abi_version")
        minor_global = exports.get("opa_wasm_abi_minor_version")
        major = major_global.value(self.store)
        minor = minor_global.value(self.store) if isinstance(minor_global, wasmtime.Global) else 0
        if major != 1:
            raise PolicyLoadError(f"unsupported OPA wasm ABI {major}.{minor}; this host implements 1.x")
        return major, minor

    def _builtin_table(self, table: Any) -> dict[int, str]:
        if not isinstance(table, dict) or not all(isinstance(value, int) for value in table.values()):
            raise PolicyLoadError(f"builtins() must map names to ids, got {table!r:.200}")
        missing = sorted(name for name in table if name not in self._builtins)
        if missing:
            raise PolicyLoadError(
                f"the policy needs built-in functions this host does not provide: {', '.join(missing)}. "
                "Add them with OpaWasmEngine(builtins={...}) or avoid them in the policy."
            )
        return {builtin_id: name for name, builtin_id in table.items()}

    @staticmethod
    def _entrypoint_table(table: Any) -> dict[str, int]:
        if not isinstance(table, dict) or not all(isinstance(value, int) for value in table.values()):
            raise PolicyLoadError(f"entrypoints() must map names to ids, got {table!r:.200}")
        return dict(table)

    # --- Evaluation ---------------------------------------------------------------------------------

    def evaluate(self, entrypoint_id: int, raw_input: bytes, timeout: float | None = None) -> bytes:
        """The result set of one evaluation, as the JSON bytes the module wrote. With a `timeout`, the
        caller bumps the engine's epoch once at the deadline, which traps."""
        self._failure = None
        self._timeout = timeout
        self.store.set_fuel(self._fuel)
        self.store.set_epoch_deadline(_NO_EPOCH_DEADLINE if timeout is None else 1)
        if self._fast:
            input_address = self._eval_heap_pointer
            self._reserve(input_address + len(raw_input), what="the input")
            self.memory.write(self.store, raw_input, input_address)
            result = self._call(
                "opa_eval", 0, entrypoint_id, self._data_address, input_address, len(raw_input),
                input_address + len(raw_input), 0,
            )  # fmt: skip
            return self._read_string(result)
        self._call("opa_heap_ptr_set", self._eval_heap_pointer)
        input_address = self._parse_json(raw_input, what="the input", free=False)
        context = self._call("opa_eval_ctx_new")
        self._call("opa_eval_ctx_set_input", context, input_address)
        self._call("opa_eval_ctx_set_data", context, self._data_address)
        self._call("opa_eval_ctx_set_entrypoint", context, entrypoint_id)
        self._call("eval", context)
        return self._read_string(self._call("opa_json_dump", self._call("opa_eval_ctx_get_result", context)))

    def _call(self, export: str, *args: int) -> int:
        """Call an export; traps, aborts and host-function failures become PolicyErrors."""
        try:
            result = self._functions[export](*args)
        except Exception as exc:
            if self._failure is not None:
                raise self._failure from None
            if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                raise PolicyTimeout(f"the policy used up its budget of {self._fuel} wasm instructions") from None
            if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                budget = "its time budget" if self._timeout is None else f"its budget of {self._timeout * 1000:g} ms"
                raise PolicyTimeout(f"the policy did not finish within {budget}") from None
            if isinstance(exc, wasmtime.Trap | wasmtime.WasmtimeError):
                raise PolicyEvaluationError(f"the policy module trapped in {export}: {_trap_reason(exc)}") from None
            raise
        return result

    # Below, `free` releases the JSON text once used. Only what outlives an evaluation (the data, the
    # tables read at load) needs it: the heap is reset before the next evaluation anyway.

    def _parse_json(self, raw: bytes, what: str, free: bool) -> int:
        address = self._call("opa_malloc", len(raw))
        self._check_range(address, len(raw), what="opa_malloc")
        self.memory.write(self.store, raw, address)
        value = self._call("opa_json_parse", address, len(raw))
        if value == 0:
            raise PolicyEvaluationError(f"the policy module could not parse {what} ({len(raw)} bytes of JSON)")
        if free:
            self._call("opa_free", address)
        return value

    def _dump_json(self, value_address: int, free: bool) -> Any:
        text_address = self._call("opa_json_dump", value_address)
        text = self._read_string(text_address)
        if free:
            self._call("opa_free", text_address)
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError:
            raise PolicyEvaluationError(f"the policy module wrote invalid JSON: {text[:200]!r}") from None

    def _read_string(self, address: int) -> bytes:
        """The NUL-terminated string at `address`, never reading past the end of memory."""
        size = self.memory.data_len(self.store)
        self._check_range(address, 1, what="the module")
        parts: list[bytes] = []
        start, chunk = address, 4096
        while start < size:
            block = self.memory.read(self.store, start, min(size, start + chunk))
            end = block.find(0)
            if end >= 0:
                parts.append(bytes(block[:end]))
                return b"".join(parts)
            parts.append(bytes(block))
            start += len(block)
            chunk *= 8
        raise PolicyEvaluationError(f"the string at address {address} runs off the end of memory (no NUL)")

    def _check_range(self, address: int, length: int, what: str) -> None:
        size = self.memory.data_len(self.store)
        if address == 0 or address + length > size:
            raise PolicyEvaluationError(f"{what} returned address {address}, outside the {size}-byte memory")

    def _reserve(self, end: int, what: str) -> None:
        """Grow memory so that [0, end) exists."""
        missing = end - self.memory.data_len(self.store)
        if missing <= 0:
            return
        try:
            self.memory.grow(self.store, math.ceil(missing / PAGE_SIZE))
        except wasmtime.WasmtimeError:
            raise PolicyEvaluationError(
                f"{what} ({end - self._eval_heap_pointer} bytes) does not fit in the policy's memory "
                f"(limit {self._max_memory_bytes // PAGE_SIZE} pages or the module's own maximum)"
            ) from None

    # --- Host functions -----------------------------------------------------------------------------

    def _host_function(self, name: str) -> Callable[..., Any]:
        implementation: Callable[..., Any] = {
            "opa_abort": self._abort,
            "opa_println": self._println,
        }.get(name, self._builtin)

        def host_function(*args: int) -> Any:
            # Exceptions must not cross into wasm as themselves: wasmtime-py keeps the last one in a
            # process-wide slot. Keep the real error here and stop the call with a trap.
            try:
                return implementation(*args)
            except PolicyError as exc:
                self._failure = self._failure or exc
            except Exception as exc:
                self._failure = self._failure or PolicyEvaluationError(f"{name} failed: {exc!r}")
            raise _HostFailure(name)

        return host_function

    def _abort(self, address: int) -> NoReturn:
        message = self._read_string(address & 0xFFFFFFFF).decode(errors="replace")
        raise PolicyEvaluationError(f"the policy aborted: {message}")

    def _println(self, address: int) -> None:
        log.info("policy print: %s", self._read_string(address & 0xFFFFFFFF).decode(errors="replace"))

    def _builtin(self, builtin_id: int, _context: int, *arguments: int) -> int:
        name = self._builtin_names.get(builtin_id)
        if name is None:
            raise PolicyEvaluationError(
                f"the policy called built-in id {builtin_id}, which its builtins() does not list"
            )
        values = [self._dump_json(argument & 0xFFFFFFFF, free=False) for argument in arguments]
        try:
            result = self._builtins[name](*values)
        except PolicyError:
            raise
        except Exception as exc:
            raise PolicyEvaluationError(f"built-in {name} failed: {exc}") from None
        if result is UNDEFINED:
            return 0
        return self._parse_json(canonical_json(result), what=f"the result of {name}", free=False)


def _decision_value(result: bytes, entrypoint: str) -> Any:
    try:
        result_set = msgspec.json.decode(result)
    except msgspec.DecodeError:
        raise PolicyEvaluationError(f"{entrypoint}: the policy returned invalid JSON: {result[:200]!r}") from None
    if result_set == []:
        raise PolicyUndefined(f"{entrypoint} is undefined for this input")
    if (
        not isinstance(result_set, list)
        or len(result_set) != 1
        or not isinstance(result_set[0], dict)
        or "result" not in result_set[0]
    ):
        raise PolicyEvaluationError(f'{entrypoint}: expected a result set like [{{"result": …}}], got {result[:200]!r}')
    return result_set[0]["result"]


def _trap_reason(error: Exception) -> str:
    """The kind of trap ("unreachable", "stack overflow", ...), else the message's first line."""
    code = getattr(error, "trap_code", None)
    if isinstance(code, wasmtime.TrapCode):
        return code.name.lower().replace("_", " ")
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
