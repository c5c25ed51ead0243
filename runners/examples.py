"""The example workflows ``controlplane dev`` runs. With a provider key in the environment (for example
``OPENAI_API_KEY``) the LLM calls go to the model; without one they answer through LiteLLM's own
``mock_response``, so the examples run anywhere and never touch the network by accident."""

from __future__ import annotations

import os
from typing import Any

from runners.context import WorkflowContext
from runners.registry import workflow

MODEL = os.environ.get("CP_EXAMPLE_MODEL", "gpt-4o-mini")
_PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "MISTRAL_API_KEY")


def llm_options(offline_answer: str) -> dict[str, Any]:
    if any(os.environ.get(key) for key in _PROVIDER_KEYS):
        return {}
    return {"mock_response": offline_answer}


def execute(plan: str, *, idempotency_key: str) -> dict[str, Any]:
    """Stands for the real action; the idempotency key is what a real executor would pass downstream."""
    return {
        "executed_steps": [line.strip("- ").strip() for line in plan.splitlines() if line.strip()],
        "idempotency_key": idempotency_key,
    }


@workflow("agent-deploy", version=1)
async def agent_deploy(ctx: WorkflowContext, payload: dict[str, Any] | None) -> dict[str, Any]:
    """An agent plans with an LLM, asks a policy whether the plan may run and needs a human, waits for
    one if so, executes and reports. Each model call is checked against the tool policy first."""
    payload = payload or {}
    goal = payload.get("goal", "deploy the web service")
    environment = payload.get("environment", "staging")
    plan = await ctx.llm(
        "plan",
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a release agent. Answer with a short list of steps."},
            {"role": "user", "content": f"Plan how to {goal} in {environment}."},
        ],
        **llm_options("- build the image\n- run the migrations\n- roll out to 10%, then 100%"),
    )
    # The policy decides (and the log records) whether this plan may run and whether a human must agree:
    # by default production needs approval (policies_wasm/policies, "approval_environments").
    tools = ["deploy"]
    verdict = await ctx.policy("controlplane/submit", {"environment": environment, "tools": tools})
    if not verdict["allow"]:
        return {"executed": False, "decision": "denied by policy", "reasons": verdict["reasons"]}
    if verdict["require_approval"]:
        reasons = "; ".join(verdict["reasons"])
        decision = await ctx.request_approval(
            f"{goal} in {environment}: {reasons}",
            timeout_seconds=3600,
            # What the human approves: exactly the plan that will run, and why a human must agree.
            details={
                "goal": goal,
                "environment": environment,
                "plan": plan["content"],
                "tools": tools,
                "policy_reasons": verdict["reasons"],
            },
        )
        if decision["status"] != "approved":
            return {"executed": False, "decision": decision["status"]}
    outcome = await ctx.step("execute", execute, plan["content"])
    report = await ctx.llm(
        "report",
        model=MODEL,
        messages=[{"role": "user", "content": f"Summarise for the team in one line: {outcome['executed_steps']}"}],
        **llm_options("Rolled out the web service after approval."),
    )
    return {
        "executed": True,
        "steps": outcome["executed_steps"],
        "report": report["content"],
        "llm_cost_usd": [plan["cost_usd"], report["cost_usd"]],
    }


@workflow("two-person-change", version=1)
async def two_person_change(ctx: WorkflowContext, payload: dict[str, Any] | None) -> dict[str, Any]:
    """A change two approvers must accept; if they have not decided in time, admins are added."""
    payload = payload or {}
    change = payload.get("change", "rotate the database credentials")
    decision = await ctx.request_approval(
        change,
        quorum=2,
        timeout_seconds=payload.get("timeout_seconds", 24 * 3600),
        escalate_after_seconds=payload.get("escalate_after_seconds", 4 * 3600),
        escalate_to=("role:admin",),
        details={"change": change},
    )
    return {
        "change": change,
        "decision": decision["status"],
        "approved_by": [d["by"] for d in decision["decisions"] if d["decision"] == "approve"],
    }


EXAMPLES = [agent_deploy, two_person_change]
