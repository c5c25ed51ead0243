"""The submit policy: every submission is decided by ``controlplane/submit`` before anything is
appended. The decision travels in the command, so the log records it either way: a denial as
``TaskSubmissionDenied`` (and a 403), an approval requirement as a task that starts out waiting for a
human.

Which rules decide: the newest bundle the org pushed (``POST /v1/policy-bundles``), else the shipped
one. The org's current version is read from the log and kept for ``POLICY_REFRESH_SECONDS``; a push
through this gateway takes effect here at once, on other gateways within that time. The version
that decided is recorded with the task, whose workflow is then decided by that version only."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from core.events import PolicyBundlePushed, PolicyDecision
from core.handler import CommandHandler
from core.policy_set import POLICY_AGGREGATE, POLICY_SET_ID, PolicySet
from core.subjects import parse_aggregate_subject
from gateway.bodies import SubmitTaskBody
from gateway.claims import ClaimIndex
from policies_wasm import Bundle, EngineCache, PolicyEngine, default_bundle
from projections.read import DATABASE_UNAVAILABLE, ReadModel

SUBMIT_POLICY = "controlplane/submit"
TOKENS_CACHE_SECONDS = 5.0
POLICY_REFRESH_SECONDS = 2.0
# Optional facts a submitter may declare in the task's metadata, passed on to the policy as they are.
DECLARED = ("environment", "tools", "models", "estimated_cost_usd")


def pushed_bundle(pushed: PolicyBundlePushed) -> Bundle:
    return Bundle(
        modules=pushed.modules,
        data=pushed.data,
        wasm=pushed.wasm,
        revision=pushed.revision,
        origin=f"policy bundle version {pushed.version}",
    )


class SubmitGate:
    def __init__(
        self,
        bundle: Bundle,
        engine: PolicyEngine,
        engines: EngineCache,
        handler: CommandHandler,
        claim_index: ClaimIndex,
        read_model: ReadModel,
    ) -> None:
        self.bundle, self.engine = bundle, engine
        """The shipped bundle and its engine: what decides for orgs that pushed none."""
        self.engines = engines
        self._handler, self._claim_index, self._read_model = handler, claim_index, read_model
        self._tokens: dict[str, tuple[float, int]] = {}
        self._pushed: dict[str, tuple[float, int | None, Bundle]] = {}

    @classmethod
    async def open(cls, handler: CommandHandler, claim_index: ClaimIndex, read_model: ReadModel) -> SubmitGate:
        bundle = default_bundle()
        engines = EngineCache()
        engine = await engines.engine(bundle)  # a shipped bundle that does not compile stops the start
        return cls(bundle, engine, engines, handler, claim_index, read_model)

    async def bundle_for(self, org: str) -> tuple[int | None, Bundle]:
        """The org's current bundle and its version (None: the shipped bundle)."""
        cached = self._pushed.get(org)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1], cached[2]
        policy_set, _ = await self._handler.load(org, POLICY_AGGREGATE, POLICY_SET_ID)
        assert isinstance(policy_set, PolicySet)
        return self._remember(org, policy_set.current)

    def observe(self, subject: str, state: Any, seq: int) -> None:
        """A push through this gateway decides the next submit here."""
        if isinstance(state, PolicySet):
            self._remember(parse_aggregate_subject(subject).org, state.current)

    def _remember(self, org: str, pushed: PolicyBundlePushed | None) -> tuple[int | None, Bundle]:
        version, bundle = (None, self.bundle) if pushed is None else (pushed.version, pushed_bundle(pushed))
        self._pushed[org] = (time.monotonic() + POLICY_REFRESH_SECONDS, version, bundle)
        return version, bundle

    async def decide(self, org: str, spec: SubmitTaskBody) -> tuple[PolicyDecision, int | None]:
        """The decision and the org's bundle version that made it. Raises a ``PolicyError`` when the
        policy cannot decide (the caller refuses the submit)."""
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
        version, bundle = await self.bundle_for(org)
        decided = (await self.engines.engine(bundle)).evaluate(SUBMIT_POLICY, facts)
        return PolicyDecision(**msgspec.structs.asdict(decided)), version

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
