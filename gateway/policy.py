"""The submit policy: every submission is decided by ``controlplane/submit`` before anything is
appended. The decision travels in the command, so the log records it either way: a denial as
``TaskSubmissionDenied`` (and a 403), an approval requirement as a task that starts out waiting for a
human."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from core.events import PolicyDecision
from gateway.bodies import SubmitTaskBody
from gateway.claims import ClaimIndex
from policies_wasm import Bundle, PolicyEngine, default_bundle, open_engine
from projections.read import DATABASE_UNAVAILABLE, ReadModel

SUBMIT_POLICY = "controlplane/submit"
TOKENS_CACHE_SECONDS = 5.0
# Optional facts a submitter may declare in the task's metadata, passed on to the policy as they are.
DECLARED = ("environment", "tools", "models", "estimated_cost_usd")


class SubmitGate:
    def __init__(self, bundle: Bundle, engine: PolicyEngine, claim_index: ClaimIndex, read_model: ReadModel) -> None:
        self.bundle, self.engine = bundle, engine
        self._claim_index, self._read_model = claim_index, read_model
        self._tokens: dict[str, tuple[float, int]] = {}

    @classmethod
    async def open(cls, claim_index: ClaimIndex, read_model: ReadModel) -> SubmitGate:
        bundle = default_bundle()
        engine = await asyncio.to_thread(open_engine, bundle)  # compiling a bundle takes a while
        return cls(bundle, engine, claim_index, read_model)

    async def decide(self, org: str, spec: SubmitTaskBody) -> PolicyDecision:
        """Raises a ``PolicyError`` when the policy cannot decide (the caller refuses the submit)."""
        facts: dict[str, Any] = {
            "org": org,
            "queue": spec.queue,
            "task_type": spec.type,
            "payload_bytes": len(msgspec.json.encode(spec.payload)),
            "usage": {
                "org_in_flight": self._claim_index.in_flight(org),
                "queue_in_flight": self._claim_index.in_flight(org, spec.queue),
            },
        }
        facts.update({name: spec.metadata[name] for name in DECLARED if name in spec.metadata})
        if spec.workflow is not None:
            facts["workflow"] = spec.workflow.name
        tokens = await self._tokens_today(org)
        if tokens is not None:  # unknown while PostgreSQL is down: a token quota then denies
            facts["usage"]["tokens_today"] = tokens
        decided = self.engine.evaluate(SUBMIT_POLICY, facts)
        return PolicyDecision(
            entrypoint=decided.entrypoint,
            value=decided.value,
            engine=decided.engine,
            bundle_digest=decided.bundle_digest,
            input_digest=decided.input_digest,
            duration_ms=decided.duration_ms,
        )

    async def _tokens_today(self, org: str) -> int | None:
        cached = self._tokens.get(org)
        if cached is not None and time.monotonic() - cached[0] < TOKENS_CACHE_SECONDS:
            return cached[1]
        try:
            tokens = await self._read_model.tokens_on(org, datetime.now(UTC).date())
        except DATABASE_UNAVAILABLE:
            return None
        self._tokens[org] = (time.monotonic(), tokens)
        return tokens
