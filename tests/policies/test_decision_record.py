"""An engine's decision and the log's record of it: the domain (``core.domain.events.PolicyDecision``)
and the engines (``policies_wasm.engine.Decision``) may not import each other, so each declares the
fields; these tests hold the two declarations together, and ``PolicyDecision.from_engine`` is the one
conversion."""

from __future__ import annotations

import msgspec

from core.domain.events import PolicyDecision
from policies_wasm.engine import Bundle, Decision
from policies_wasm.engines import open_engine

ALLOW_ALL = """package demo

# METADATA
# entrypoint: true
decision := {"allow": true, "require_approval": true, "reasons": ["asked for it"]}
"""


def test_the_record_declares_exactly_the_fields_of_an_engine_decision() -> None:
    def declared(kind: type[msgspec.Struct]) -> list[tuple[str, object, object]]:
        return [(field.name, field.type, field.default) for field in msgspec.structs.fields(kind)]

    assert declared(PolicyDecision) == declared(Decision)


def test_an_engines_decision_is_recorded_whole() -> None:
    decided = open_engine(Bundle(modules={"demo.rego": ALLOW_ALL})).evaluate("demo/decision", {"org": "acme"})
    recorded = PolicyDecision.from_engine(decided)
    assert msgspec.to_builtins(recorded) == msgspec.to_builtins(decided)
    assert recorded.allows and recorded.needs_approval and recorded.reasons == ["asked for it"]
    assert msgspec.json.decode(msgspec.json.encode(recorded), type=PolicyDecision) == recorded
