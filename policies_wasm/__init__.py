"""Policies: Rego sources, the policy engine interface, an OPA-wasm host on wasmtime, a regopy engine.

The engines themselves (`policies_wasm.opa_wasm`, `policies_wasm.rego`) are imported when a bundle
needs them (`policies_wasm.engines` picks one); see README.md in this folder.
"""

from policies_wasm.engine import (
    Bundle,
    Decision,
    PolicyEngine,
    PolicyError,
    PolicyEvaluationError,
    PolicyInputError,
    PolicyLoadError,
    PolicyTimeout,
    PolicyUndefined,
    UnknownEntrypoint,
    default_bundle,
    input_digest,
)
from policies_wasm.engines import EngineCache, open_engine

__all__ = [
    "Bundle",
    "Decision",
    "EngineCache",
    "PolicyEngine",
    "PolicyError",
    "PolicyEvaluationError",
    "PolicyInputError",
    "PolicyLoadError",
    "PolicyTimeout",
    "PolicyUndefined",
    "UnknownEntrypoint",
    "default_bundle",
    "input_digest",
    "open_engine",
]
