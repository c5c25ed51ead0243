"""The submit gate: every submission is decided by the submit policy (``controlplane/submit``) before
anything is appended. The decision travels in the command, so the log records it either way: a denial
as ``TaskSubmissionDenied`` (over HTTP, a 403), an approval requirement as a task that starts out
waiting for a human.

Which rules decide: the newest bundle the org pushed (``POST /v1/policy-bundles``), else the shipped
one. The org's current version is read from the log and kept for ``POLICY_REFRESH_SECONDS``; a push
through this process takes effect here at once, in other processes within that time. The version
that decided is recorded with the task, whose workflow is then decided by that version only.

Decisions are evaluated off the event loop on a time budget (``policies_wasm.budget``): a version
that overruns it fails that org's submit (``PolicyUnavailable``, naming the version) and never slows
other orgs. A push is refused when an entrypoint overruns it on inputs like the ones it will be asked
(``SubmitGate.check_budget``).

A burst of submits (a thousand schedules firing at one second) must not cost a policy evaluation each
merely because the in-flight counts moved between them: the usage facts go into the input only when
the bundle's ``controlplane/submit_usage`` names them for the input's scope (an org without quotas
reads none, so its repeated submissions are answered from the evaluator's decision memory), and the
day's spend is read from PostgreSQL only when a token or spend quota applies. A bundle without that
entrypoint is given every fact."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from application.claim_index import ClaimIndex
from core.domain.events import PolicyBundlePushed, PolicyDecision
from core.domain.policy_set import POLICY_AGGREGATE, POLICY_SET_ID, PolicySet
from core.domain.subjects import parse_aggregate_subject
from core.log.handler import CommandHandler
from policies_wasm import Bundle, PolicyError, PolicyTimeout, default_bundle
from policies_wasm.budget import PolicyEvaluator
from projections.read import DATABASE_UNAVAILABLE, ReadModel

SUBMIT_POLICY = "controlplane/submit"
USAGE_POLICY = "controlplane/submit_usage"
"""Optional: the names of the ``usage`` facts the submit decision reads for an input given without usage."""
USAGE_FACTS = frozenset({"org_in_flight", "queue_in_flight", "tokens_today", "cost_today_usd"})
SPEND_FACTS = frozenset({"tokens_today", "cost_today_usd"})
TOOL_POLICY = "controlplane/tool"
SPEND_CACHE_SECONDS = 5.0
"""How old the org's recorded spend of the day (tokens, USD) a submit decision sees may be."""
POLICY_REFRESH_SECONDS = 2.0
# Optional facts a submitter may declare in the task's metadata, passed on to the policy as they are.
# Not the environment: that is the queue's, from the org's environments (never the submitter's word).
DECLARED = ("tools", "models", "estimated_cost_usd")


def pushed_bundle(pushed: PolicyBundlePushed) -> Bundle:
    return Bundle(
        modules=pushed.modules,
        data=pushed.data,
        wasm=pushed.wasm,
        revision=pushed.revision,
        origin=f"policy bundle version {pushed.version}",
    )


def representative_inputs(bundle: Bundle, org: str) -> list[tuple[str, dict[str, Any]]]:
    """Inputs like the ones each of the bundle's entrypoints will be asked for `org`, for the push-time
    budget check: submissions (with every usage fact, and without usage for the question which usage
    facts they read) and tool/model calls with every declared fact, in the scope of the levels the
    bundle's data configures for the org; other entrypoints get the scope ``ctx.policy`` adds to every
    input."""
    scope: dict[str, Any] = {"org": org, "queue": "default", "task_type": "example"}
    config = bundle.data.get("policy_config")
    orgs = config.get("orgs") if isinstance(config, dict) else None
    levels = orgs.get(org) if isinstance(orgs, dict) else None
    if isinstance(levels, dict):
        for name, level in (("environment", "environments"), ("queue", "queues"), ("workflow", "workflows")):
            configured = levels.get(level)
            if isinstance(configured, dict) and configured:
                scope[name] = min(configured)
    usage = {"org_in_flight": 1, "queue_in_flight": 1, "tokens_today": 1000, "cost_today_usd": 1}
    declared = {"tools": ["example.tool"], "models": ["example-model"], "estimated_cost_usd": 1}
    submission = {**scope, "payload_bytes": 256, **declared}
    asked: dict[str, list[dict[str, Any]]] = {
        SUBMIT_POLICY: [{**submission, "usage": usage}],
        USAGE_POLICY: [submission],
        TOOL_POLICY: [
            {**scope, "tool": "example.tool", "usage": {"tokens_today": 1000}},
            {**scope, "model": "example-model", "tokens_requested": 1000, "usage": {"tokens_today": 1000}},
        ],
    }
    return [(entrypoint, input) for entrypoint in bundle.entrypoints for input in asked.get(entrypoint, [scope])]


@dataclass(frozen=True)
class EngineInfo:
    name: str  # "regopy" | "opa-wasm"


class SubmitGate:
    def __init__(
        self,
        bundle: Bundle,
        engine: EngineInfo,
        evaluator: PolicyEvaluator,
        handler: CommandHandler,
        claim_index: ClaimIndex,
        read_model: ReadModel,
    ) -> None:
        self.bundle, self.engine = bundle, engine
        """The shipped bundle and its engine: what decides for orgs that pushed none."""
        self.evaluator = evaluator
        """Evaluates every version, off the event loop and on the budget."""
        self._handler, self._claim_index, self._read_model = handler, claim_index, read_model
        self._spend: dict[str, tuple[float, tuple[int, float]]] = {}
        self._pushed: dict[str, tuple[float, int | None, Bundle]] = {}

    @classmethod
    async def open(cls, handler: CommandHandler, claim_index: ClaimIndex, read_model: ReadModel) -> SubmitGate:
        bundle = default_bundle()
        evaluator = PolicyEvaluator()
        try:
            engine = await evaluator.prepare(bundle)  # a shipped bundle that does not compile stops the start
        except BaseException:
            evaluator.close()
            raise
        return cls(bundle, EngineInfo(engine), evaluator, handler, claim_index, read_model)

    def close(self) -> None:
        """Stops the evaluator's worker processes (they also stop with this process)."""
        self.evaluator.close()

    async def bundle_for(self, org: str) -> tuple[int | None, Bundle]:
        """The org's current bundle and its version (None: the shipped bundle)."""
        cached = self._pushed.get(org)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1], cached[2]
        policy_set, _ = await self._handler.load(org, POLICY_AGGREGATE, POLICY_SET_ID)
        assert isinstance(policy_set, PolicySet)
        return self._remember(org, policy_set.current)

    def observe(self, subject: str, state: Any, seq: int) -> None:
        """A push through this process decides the next submit here."""
        if isinstance(state, PolicySet):
            self._remember(parse_aggregate_subject(subject).org, state.current)

    def _remember(self, org: str, pushed: PolicyBundlePushed | None) -> tuple[int | None, Bundle]:
        version, bundle = (None, self.bundle) if pushed is None else (pushed.version, pushed_bundle(pushed))
        self._pushed[org] = (time.monotonic() + POLICY_REFRESH_SECONDS, version, bundle)
        return version, bundle

    async def decide(
        self,
        org: str,
        *,
        task_type: str,
        payload: Any,
        metadata: dict[str, Any],
        workflow: str | None,
        queue: str,
        environment: str | None,
    ) -> tuple[PolicyDecision, int | None]:
        """The decision and the org's bundle version that made it, for a task of ``task_type`` running
        ``workflow`` (if any) on ``queue``, which is in ``environment`` (the server's answer, or None: the
        policy input then has no environment). Raises a ``PolicyError`` when the policy cannot decide
        (the caller refuses the submit): ``PolicyTimeout``, naming the version, when it overran the budget."""
        facts: dict[str, Any] = {
            "org": org,
            "queue": queue,
            "task_type": task_type,
            "payload_bytes": len(msgspec.json.encode(payload)),
        }
        facts.update({name: metadata[name] for name in DECLARED if name in metadata})
        if environment is not None:
            facts["environment"] = environment
        if workflow is not None:
            facts["workflow"] = workflow
        version, bundle = await self.bundle_for(org)
        read = await self._usage_read(bundle, org, facts)
        facts["usage"] = await self._usage(org, queue, read)
        try:
            decided = await self.evaluator.evaluate(bundle, SUBMIT_POLICY, facts, owner=org)
        except PolicyTimeout as exc:
            raise PolicyTimeout(self._overrun(org, version, exc)) from exc
        return PolicyDecision.from_engine(decided), version

    async def _usage_read(self, bundle: Bundle, org: str, facts: dict[str, Any]) -> frozenset[str]:
        """The usage facts ``bundle``'s submit decision reads for ``facts`` (an input without usage), as its
        ``USAGE_POLICY`` names them; every fact when the bundle has no such entrypoint (one written before
        it) or it cannot say, so that the decision is then made as it always was."""
        if USAGE_POLICY not in bundle.entrypoints:
            return USAGE_FACTS
        try:
            declared = await self.evaluator.evaluate(bundle, USAGE_POLICY, facts, owner=org)
        except PolicyError:  # an overrun also quarantines the bundle, so the decision itself then fails
            return USAGE_FACTS
        if not isinstance(declared.value, list) or not all(isinstance(name, str) for name in declared.value):
            return USAGE_FACTS
        return USAGE_FACTS.intersection(declared.value)

    async def _usage(self, org: str, queue: str, read: frozenset[str]) -> dict[str, int | float]:
        """The usage facts named in ``read``: in-flight counts from the claim index, the day's spend from
        the read model (only when read: it is a PostgreSQL query)."""
        usage: dict[str, int | float] = {
            "org_in_flight": self._claim_index.in_flight(org),
            "queue_in_flight": self._claim_index.in_flight(org, queue),
        }
        if read & SPEND_FACTS:
            spend = await self._spend_today(org)
            if spend is not None:  # unknown while PostgreSQL is down: a token or spend quota then denies
                usage["tokens_today"], usage["cost_today_usd"] = spend
        return {name: count for name, count in usage.items() if name in read}

    async def check_budget(self, bundle: Bundle, org: str) -> None:
        """Raises ``PolicyTimeout`` naming the entrypoint when one of the bundle's entrypoints overruns
        the budget on a representative input. Other failures on these made-up inputs (undefined, an
        error) say nothing about time and are left to the real inputs."""
        for entrypoint, input in representative_inputs(bundle, org):
            try:
                await self.evaluator.evaluate(bundle, entrypoint, input, owner=org)
            except PolicyTimeout as exc:
                raise PolicyTimeout(
                    f"entrypoint {entrypoint} did not decide within the policy budget of "
                    f"{self.evaluator.budget.describe()} on the input {msgspec.json.encode(input).decode()}: {exc}. "
                    "Every decision must finish within the budget: make the rules do less work per decision "
                    "(no loops over large ranges or the cross product of big collections)"
                ) from exc
            except PolicyError:
                continue

    def _overrun(self, org: str, version: int | None, exc: PolicyTimeout) -> str:
        budget = self.evaluator.budget.describe()
        if version is None:
            return (
                f"the shipped policies did not decide {SUBMIT_POLICY} for org {org} within the policy budget of "
                f"{budget}: {exc}. Declare fewer tools or models, or ask the operator to raise the budget"
            )
        return (
            f"org {org}'s policy bundle version {version} did not decide {SUBMIT_POLICY} within the policy budget "
            f"of {budget}: {exc}. An admin of {org} should push a version whose rules decide within the budget "
            "(POST /v1/policy-bundles refuses one that does not), or push an earlier version again"
        )

    async def _spend_today(self, org: str) -> tuple[int, float] | None:
        """The tokens and USD the org's recorded LLM calls used today (UTC): what the quotas count, never
        a submitter's estimate."""
        cached = self._spend.get(org)
        if cached is not None and time.monotonic() - cached[0] < SPEND_CACHE_SECONDS:
            return cached[1]
        try:
            spend = await self._read_model.spend_on(org, datetime.now(UTC).date())
        except DATABASE_UNAVAILABLE:
            return None
        self._spend[org] = (time.monotonic(), spend)
        return spend
