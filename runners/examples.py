"""The example workflows ``controlplane dev`` runs. With a provider key in the environment (for example
``OPENAI_API_KEY``) the LLM calls go to the model; without one they answer through LiteLLM's own
``mock_response``, so the examples run anywhere and never touch the network by accident."""

from __future__ import annotations

import os
from typing import Any

from runners.context import QuestionDeclined, WorkflowContext
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


QUESTION_MARKER = "QUESTION:"
CHAT_SYSTEM_PROMPT = (
    "You are an operations agent. If the request is ambiguous, reply with exactly one clarifying question "
    f"that starts with {QUESTION_MARKER!r} and nothing else. Otherwise answer it in a few lines."
)
CHAT_FORM: dict[str, Any] = {
    "type": "object",
    "title": "Your reply",
    "properties": {
        "answer": {"type": "string", "title": "Your answer"},
        "done": {"type": "boolean", "title": "Done: end the conversation", "default": False},
    },
    "additionalProperties": False,
}
"""What the human fills in at each turn: a text, or ``done`` to end the conversation."""


def offline_chat_reply(turn: int, last_message: str) -> str:
    """The mock model, deterministic: it first asks what the request means, then answers with the
    human's last words, so the question-and-answer loop can be tried offline."""
    if turn == 0:
        return f"{QUESTION_MARKER} Which service and which environment do you mean by {last_message!r}?"
    return f"Understood ({last_message}). Plan: build, run the migrations, roll out to 10% and then 100%."


@workflow("agent-chat", version=1)
async def agent_chat(ctx: WorkflowContext, payload: dict[str, Any] | None) -> dict[str, Any]:
    """A multi-turn conversation between an agent and a human. The model answers the request; a reply
    starting with ``QUESTION:`` is a clarifying question, which is put to a human (``ctx.ask``) and
    whose answer joins the conversation; any other reply is shown to the human, who adds to it or says
    the conversation is done. Every turn is journaled: a runner that crashes mid-conversation is
    replaced by one that replays to the same point, asking nobody and no model twice."""
    payload = payload or {}
    request = str(payload.get("request", "roll out the new release"))
    max_turns = int(payload.get("max_turns", 10))
    timeout_seconds = payload.get("timeout_seconds", 24 * 3600)
    conversation = [{"role": "system", "content": CHAT_SYSTEM_PROMPT}, {"role": "user", "content": request}]
    ended = "turn limit reached"
    for turn in range(max_turns):
        reply = await ctx.llm(
            f"turn-{turn}",
            model=MODEL,
            messages=list(conversation),  # the whole history, every turn
            **llm_options(offline_chat_reply(turn, conversation[-1]["content"])),
        )
        content = (reply["content"] or "").strip()
        conversation.append({"role": "assistant", "content": content})
        if content.startswith(QUESTION_MARKER):
            question = content.removeprefix(QUESTION_MARKER).strip()
        else:
            question = f"{content}\n\nAnything to add? Answer to go on, or tick done."
        try:
            answer = await ctx.ask(question, form=CHAT_FORM, timeout_seconds=timeout_seconds)
        except QuestionDeclined as declined:
            ended = f"the question was {declined.status}"
            break
        if answer.get("done"):
            ended = "done"
            break
        conversation.append({"role": "user", "content": str(answer.get("answer", ""))})
    return {"request": request, "conversation": conversation[1:], "ended": ended}


EXAMPLES = [agent_deploy, two_person_change, agent_chat]
