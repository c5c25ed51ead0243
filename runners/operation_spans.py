"""What the spans of a workflow's operations say (``runners.context`` opens them): an LLM call's model,
tokens and cost, a policy's decision, and the time humans took to decide an approval."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core import telemetry


def result_attributes(kind: str, result: Any) -> dict[str, Any]:
    """What a span says about an operation's result: for an LLM call its model, tokens and cost (the
    OpenTelemetry GenAI names), for a policy its decision."""
    if not isinstance(result, dict):
        return {}
    if kind == "llm":
        usage = result.get("usage") or {}
        return {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": (result.get("request") or {}).get("model"),
            "gen_ai.response.model": result.get("model"),
            "gen_ai.provider.name": result.get("provider"),
            "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
            "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
            "cp.llm.cost_usd": result.get("cost_usd"),
        }
    if kind == "policy":
        value = result.get("value")
        decided = value if isinstance(value, dict) else {}
        return {
            "cp.policy.entrypoint": result.get("entrypoint"),
            "cp.policy.engine": result.get("engine"),
            "cp.policy.bundle_digest": result.get("bundle_digest"),
            "cp.policy.duration_ms": result.get("duration_ms"),
            "cp.policy.allow": decided.get("allow") if isinstance(decided.get("allow"), bool) else None,
            "cp.policy.require_approval": decided.get("require_approval")
            if isinstance(decided.get("require_approval"), bool)
            else None,
        }
    return {}


def record_wait(approval: dict[str, Any]) -> None:
    """A span for the time humans took, from the request to the decision: known only now, when a claim
    after the decision replays to it, so it is recorded with those two times."""
    try:
        started = datetime.fromisoformat(approval["created_at"].replace("Z", "+00:00"))
        ended = datetime.fromisoformat(approval["decided_at"].replace("Z", "+00:00"))
    except (AttributeError, KeyError, TypeError, ValueError):  # no times to show: no span
        return
    telemetry.record_span(
        f"{approval.get('kind') or 'approval'} wait",
        int(started.timestamp() * 1e9),
        int(ended.timestamp() * 1e9),
        {
            "cp.approval.id": approval.get("id"),
            "cp.approval.status": approval.get("status"),
            "cp.approval.decisions": len(approval.get("decisions") or ()),
            "cp.approval.escalated": approval.get("escalated"),
        },
    )
