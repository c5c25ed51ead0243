"""The choice of engine: which implementation of ``policies_wasm.engine.PolicyEngine`` a bundle gets,
and a cache of opened engines. The interface module imports no implementation; this one picks them."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from policies_wasm.engine import Bundle, PolicyEngine


def open_engine(bundle: Bundle) -> PolicyEngine:
    """The OPA-wasm engine when the bundle holds a compiled `policy.wasm`, else regopy."""
    engine: PolicyEngine
    # Imported here, not above: each engine loads its runtime (wasmtime, rego-cpp), and a process loads
    # only the one its bundles need.
    if bundle.wasm is not None:
        from policies_wasm.opa_wasm import OpaWasmEngine

        engine = OpaWasmEngine()
    else:
        from policies_wasm.rego import RegoEngine

        engine = RegoEngine()
    engine.load(bundle)
    return engine


class EngineCache:
    """Engines by bundle digest, each opened once and reused; opening compiles, so it runs in a thread.
    A bundle that fails to open raises each time it is asked for and is never cached."""

    def __init__(self, max_engines: int = 32) -> None:
        self._engines: OrderedDict[str, PolicyEngine] = OrderedDict()
        self._max_engines = max_engines
        self._opening = asyncio.Lock()

    def get(self, bundle: Bundle) -> PolicyEngine | None:
        engine = self._engines.get(bundle.digest)
        if engine is not None:
            self._engines.move_to_end(bundle.digest)
        return engine

    async def engine(self, bundle: Bundle) -> PolicyEngine:
        engine = self.get(bundle)
        if engine is not None:
            return engine
        async with self._opening:  # one compile at a time; a second asker of the same bundle finds it cached
            engine = self.get(bundle)
            if engine is None:
                engine = self._engines[bundle.digest] = await asyncio.to_thread(open_engine, bundle)
                while len(self._engines) > self._max_engines:
                    self._engines.popitem(last=False)
            return engine
