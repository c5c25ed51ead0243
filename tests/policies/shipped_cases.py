"""The shipped policies' test cases, shared by every engine that can run them.

The data document is the shipped defaults plus the orgs below, which exercise each inheritance level.
Every expected decision is written out in full: these are the promises the policies make.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from policies_wasm.engine import Bundle

ACME = {
    "settings": {
        "approval_cost_usd": 5,
        "max_tokens_per_day": 1000,
        "approval_tools": ["shell"],
        "max_tasks_in_flight_per_org": 3,
        "denied_models": ["gpt-3.5*"],
    },
    "environments": {
        "prod": {"approval_cost_usd": 1, "denied_tools": ["shell"], "max_cost_usd": 50},
    },
    "queues": {
        "batch": {"max_tasks_in_flight_per_queue": 2, "approval_cost_usd": 20},
    },
    "workflows": {
        "agent-deploy": {
            "allowed_models": ["gpt-4o*"],
            "allowed_tools": ["github.*", "shell"],
            "approval_task_types": ["deploy"],
            "max_tokens_per_day": None,
        },
    },
}
INITECH = {"settings": {"max_payload_bytes": 1000}}
HOOLI = {"settings": {"max_cost_usd_per_day": 2.5}}

# acme sets quotas, so its callers pass these counts.
IDLE = {"org_in_flight": 0, "queue_in_flight": 0, "tokens_today": 0}


def with_test_orgs(bundle: Bundle) -> Bundle:
    data = copy.deepcopy(bundle.data)
    data["policy_config"]["orgs"] = {"acme": ACME, "initech": INITECH, "hooli": HOOLI}
    return bundle.with_data(data)


@dataclass(frozen=True)
class Case:
    name: str
    entrypoint: str
    input: Any
    expected: Any


def allowed(*approval_reasons: str) -> dict[str, Any]:
    return {"allow": True, "require_approval": bool(approval_reasons), "reasons": list(approval_reasons)}


def denied(*reasons: str) -> dict[str, Any]:
    return {"allow": False, "require_approval": False, "reasons": list(reasons)}


SUBMIT = "controlplane/submit"
TOOL = "controlplane/tool"
SUBMIT_USAGE = "controlplane/submit_usage"

CASES = [
    # --- submit: approval ---------------------------------------------------------------------------
    Case("an org without settings gets the defaults", SUBMIT, {"org": "globex"}, allowed()),
    Case(
        "prod needs approval by default",
        SUBMIT,
        {"org": "globex", "environment": "prod"},
        allowed("environment prod requires approval"),
    ),
    Case("a cost at the threshold needs no approval", SUBMIT, {"org": "globex", "estimated_cost_usd": 10}, allowed()),
    Case(
        "a cost above the threshold needs approval",
        SUBMIT,
        {"org": "globex", "estimated_cost_usd": 10.5},
        allowed("estimated cost is above the approval threshold of 10 USD"),
    ),
    Case(
        "reasons come sorted",
        SUBMIT,
        {"org": "globex", "environment": "prod", "estimated_cost_usd": 20},
        allowed("environment prod requires approval", "estimated cost is above the approval threshold of 10 USD"),
    ),
    Case(
        "a sensitive tool needs approval",
        SUBMIT,
        {"org": "acme", "tools": ["shell", "search"], "usage": IDLE},
        allowed("tool shell requires approval"),
    ),
    Case(
        "a task type the workflow marks needs approval",
        SUBMIT,
        {
            "org": "acme",
            "workflow": "agent-deploy",
            "task_type": "deploy",
            "tools": ["github.create_pr"],
            "models": ["gpt-4o-mini"],
            "usage": IDLE,
        },
        allowed("task type deploy requires approval"),
    ),
    # --- submit: denial -----------------------------------------------------------------------------
    Case(
        "a cost above the limit is denied, and a denial hides approval reasons",
        SUBMIT,
        {"org": "acme", "environment": "prod", "estimated_cost_usd": 60, "usage": IDLE},
        denied("estimated cost exceeds the limit of 50 USD"),
    ),
    Case(
        "a tool the environment denies is denied",
        SUBMIT,
        {"org": "acme", "environment": "prod", "tools": ["shell"], "usage": IDLE},
        denied("tool shell is not allowed here"),
    ),
    Case(
        "a model outside the workflow's list is denied",
        SUBMIT,
        {"org": "acme", "workflow": "agent-deploy", "models": ["claude-3"], "tools": ["github.x"], "usage": IDLE},
        denied("model claude-3 is not allowed here"),
    ),
    Case(
        "a model matching a denied pattern is denied",
        SUBMIT,
        {"org": "acme", "models": ["gpt-3.5-turbo", "gpt-4o"], "usage": IDLE},
        denied("model gpt-3.5-turbo is not allowed here"),
    ),
    Case(
        "a payload above the limit is denied",
        SUBMIT,
        {"org": "initech", "payload_bytes": 2000},
        denied("payload of 2000 bytes exceeds the limit of 1000 bytes"),
    ),
    # --- submit: quotas -----------------------------------------------------------------------------
    Case(
        "an org below its in-flight limit may submit",
        SUBMIT,
        {"org": "acme", "usage": {**IDLE, "org_in_flight": 2}},
        allowed(),
    ),
    Case(
        "an org at its in-flight limit may not",
        SUBMIT,
        {"org": "acme", "usage": {**IDLE, "org_in_flight": 3}},
        denied("tasks in flight for the org: 3 in use, limit 3"),
    ),
    Case(
        "a queue at its in-flight limit may not",
        SUBMIT,
        {"org": "acme", "queue": "batch", "usage": {**IDLE, "queue_in_flight": 2}},
        denied("tasks in flight on the queue: 2 in use, limit 2"),
    ),
    Case(
        "an org out of tokens for the day may not",
        SUBMIT,
        {"org": "acme", "usage": {**IDLE, "tokens_today": 1000}},
        denied("tokens used today: 1000 in use, limit 1000"),
    ),
    Case(
        "a workflow that lifts the token limit may",
        SUBMIT,
        {"org": "acme", "workflow": "agent-deploy", "usage": {**IDLE, "tokens_today": 5000}},
        allowed(),
    ),
    Case(
        "an org whose recorded spend today reached its limit may not",
        SUBMIT,
        {"org": "hooli", "usage": {"cost_today_usd": 2.5000001}},
        denied("USD spent today (recorded LLM calls) reached the limit of 2.5"),
    ),
    Case(
        "an org under its spend limit may, whatever a submitter estimates",
        SUBMIT,
        {"org": "hooli", "estimated_cost_usd": 1, "usage": {"cost_today_usd": 2.4999}},
        allowed(),
    ),
    Case(
        "a spend limit without the day's spend denies",
        SUBMIT,
        {"org": "hooli"},
        denied("max_cost_usd_per_day is set but input.usage.cost_today_usd is missing"),
    ),
    Case(
        "a missing count for a set quota denies",
        SUBMIT,
        {"org": "acme", "queue": "batch", "usage": {"org_in_flight": 0, "tokens_today": 0}},
        denied("max_tasks_in_flight_per_queue is set but input.usage.queue_in_flight is missing"),
    ),
    # --- submit: malformed input --------------------------------------------------------------------
    Case("no org", SUBMIT, {}, denied("input.org must be a non-empty string")),
    Case("an input that is not an object", SUBMIT, ["acme"], denied("input.org must be a non-empty string")),
    Case("an empty org", SUBMIT, {"org": ""}, denied("input.org must be a non-empty string")),
    Case(
        "an org that is not a string",
        SUBMIT,
        {"org": 5},
        denied("input.org must be of type string"),
    ),
    Case(
        "every malformed field is reported",
        SUBMIT,
        {"org": "globex", "queue": 3, "tools": "shell", "estimated_cost_usd": -1, "usage": {"tokens_today": "many"}},
        denied(
            "input.estimated_cost_usd must not be negative",
            "input.queue must be of type string",
            "input.tools must be of type array",
            "input.usage.tokens_today must be a number >= 0",
        ),
    ),
    Case(
        "tools must be strings",
        SUBMIT,
        {"org": "globex", "tools": ["search", 3]},
        denied("input.tools must list strings"),
    ),
    Case(
        "a cost given as text is refused, not compared",
        SUBMIT,
        {"org": "globex", "estimated_cost_usd": "500"},
        denied("input.estimated_cost_usd must be of type number"),
    ),
    # --- submit_usage: the usage facts a submission's decision reads ---------------------------------
    Case("an org without quotas reads no usage", SUBMIT_USAGE, {"org": "globex", "queue": "batch"}, []),
    Case("an org reads the counts of its own quotas", SUBMIT_USAGE, {"org": "acme"}, ["org_in_flight", "tokens_today"]),
    Case(
        "a queue's quota adds its count",
        SUBMIT_USAGE,
        {"org": "acme", "queue": "batch", "task_type": "deploy"},
        ["org_in_flight", "queue_in_flight", "tokens_today"],
    ),
    Case(
        "a workflow that lifts a quota no longer reads its count",
        SUBMIT_USAGE,
        {"org": "acme", "workflow": "agent-deploy"},
        ["org_in_flight"],
    ),
    Case("a spend quota reads the day's spend", SUBMIT_USAGE, {"org": "hooli"}, ["cost_today_usd"]),
    Case(
        "a malformed input still reads the counts its decision quotes",
        SUBMIT_USAGE,
        {"org": "acme", "queue": 3},
        ["org_in_flight", "tokens_today"],
    ),
    # --- tool ---------------------------------------------------------------------------------------
    Case("a tool call within the defaults", TOOL, {"org": "globex", "tool": "search"}, allowed()),
    Case("a call must name a tool or a model", TOOL, {"org": "globex"}, denied("input must name a tool or a model")),
    Case(
        "a sensitive tool call needs approval",
        TOOL,
        {"org": "acme", "tool": "shell", "usage": IDLE},
        allowed("tool shell requires approval"),
    ),
    Case(
        "a tool the environment denies is denied at run time",
        TOOL,
        {"org": "acme", "environment": "prod", "tool": "shell", "usage": IDLE},
        denied("tool shell is not allowed here"),
    ),
    Case(
        "a model outside the workflow's list is denied at run time",
        TOOL,
        {"org": "acme", "workflow": "agent-deploy", "model": "claude-3"},
        denied("model claude-3 is not allowed here"),
    ),
    Case(
        "a call that would pass the token limit is denied",
        TOOL,
        {"org": "acme", "model": "gpt-4o", "tokens_requested": 20, "usage": {"tokens_today": 990}},
        denied("tokens used today: 990 + 20 requested exceeds the limit of 1000"),
    ),
    Case(
        "a call that reaches the token limit exactly is allowed",
        TOOL,
        {"org": "acme", "model": "gpt-4o", "tokens_requested": 10, "usage": {"tokens_today": 990}},
        allowed(),
    ),
    Case(
        "a token limit without today's count denies",
        TOOL,
        {"org": "acme", "model": "gpt-4o"},
        denied("max_tokens_per_day is set but input.usage.tokens_today is missing"),
    ),
    Case(
        "a costly call needs approval",
        TOOL,
        {"org": "globex", "tool": "search", "estimated_cost_usd": 12},
        allowed("estimated cost is above the approval threshold of 10 USD"),
    ),
    Case(
        "a malformed call is denied with the reason",
        TOOL,
        {"org": "globex", "tool": ["search"]},
        denied("input.tool must be of type string"),
    ),
]
