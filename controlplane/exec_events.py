"""How ``controlplane exec`` shows a run: each event of its task as one line on stderr, and for an
approval or question it waits for, who may decide it and where (the console, the API)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.client import AsyncClient, Task
from controlplane.client.models import Event
from controlplane.client.operations import ENDING_EVENTS

PARKED_EVENT = "WorkflowNonDeterministic"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Follower:
    """Prints each event of one task as a line, until the task ends or is parked."""

    gateway_url: str
    task: Task
    parked: str | None = None
    shown_approvals: set[str] = field(default_factory=set)

    async def follow(self, client: AsyncClient) -> None:
        async with contextlib.aclosing(client.stream(self.task.id)) as events:
            async for event in events:
                self.show(event)
                if event.type in ENDING_EVENTS:
                    return
                if event.type == PARKED_EVENT:
                    self.parked = _divergence(event.data)
                    return

    def show(self, event: Event) -> None:
        data = event.data
        at = str(data.get("at", ""))[11:19]
        describe = _DESCRIBE.get(event.type)
        line = describe(data) if describe is not None else _words(event.type)
        if line:
            say(f"{at}  {line}")
        if event.type == "TaskSubmitted":
            # A submit policy's gate is on the task from its first event; the submit's answer lists it.
            for approval in self.task.approvals:
                if approval.status == "pending":
                    self._waiting(at, approval.id, approval.reason, list(approval.approvers), "approval")
        elif event.type == "ApprovalRequested":
            kind = data.get("kind", "approval")
            self._waiting(at, data["approval_id"], data["reason"], data.get("approvers", []), kind)

    def _waiting(self, at: str, approval_id: str, reason: str, approvers: list[str], kind: str) -> None:
        if approval_id in self.shown_approvals:
            return
        self.shown_approvals.add(approval_id)
        who = ", ".join(approvers) or "anyone with the approver role"
        answer = "answer" if kind == "question" else "decide"
        indent = " " * (len(at) + 2)
        say(f"{at}  waiting for {kind} {approval_id}: {reason}")
        say(f"{indent}who may {answer}: {who}")
        say(f"{indent}{answer} in the console: {self.gateway_url}/console/approvals")
        say(f"{indent}or through the API: POST {self.gateway_url}/v1/approvals/{approval_id}/approve (or /reject)")


def brief(value: Any, limit: int = 200) -> str:
    """A result or error on one short line (an error's ``type: message`` when it has both)."""
    if isinstance(value, dict) and set(value) >= {"type", "message"}:
        text = f"{value['type']}: {value['message']}"
    else:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _words(event_type: str) -> str:
    """``TaskRetryDue`` -> ``task retry due``: a readable line for an event type with no description."""
    return "".join(f" {c.lower()}" if c.isupper() else c for c in event_type).strip()


def _operation(data: dict[str, Any]) -> str:
    kind, name, result = data["kind"], data["name"], data.get("result")
    if kind == "llm" and isinstance(result, dict):
        usage = result.get("usage") or {}
        tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        cost = f", ${result['cost_usd']:.4f}" if result.get("cost_usd") is not None else ""
        return f"llm {name} ({result.get('model')}, {tokens} tokens{cost}): {brief(result.get('content'), 120)}"
    if kind == "policy" and isinstance(result, dict):  # recorded by an older gateway; now PolicyDecided
        return _policy({"decision": result})
    return f"{kind} {name} -> {brief(result, 120)}"


def _policy(data: dict[str, Any]) -> str:
    decision = data["decision"]
    value = decision.get("value")
    verdict = "allowed" if isinstance(value, dict) and value.get("allow") is True else "denied"
    if isinstance(value, dict) and value.get("require_approval") is True:
        verdict += ", approval required"
    reasons = value.get("reasons") if isinstance(value, dict) else None
    because = f" ({'; '.join(map(str, reasons))})" if reasons else ""
    return f"policy {decision.get('entrypoint')}: {verdict}{because}"


def _divergence(data: dict[str, Any]) -> str:
    return f"replay diverged at journal entry {data['index']}: recorded {data['expected']}, now {data['actual']}"


def _submitted(data: dict[str, Any]) -> str:
    policy = data.get("policy")
    return "submitted" + (f"; {_policy({'decision': policy})}" if policy else "")


def _vote(vote: dict[str, Any], approval_id: str) -> str:
    """A vote of ``ApprovalVoteCast``'s data, or the ``vote`` an ``ApprovalDecided`` carries."""
    return f"{vote['by']} voted {vote['decision']} on {approval_id}" + (
        f": {vote['comment']}" if vote.get("comment") else ""
    )


_DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {
    "TaskSubmitted": _submitted,
    "TaskClaimed": lambda d: f"running on {d['worker_id']} (attempt {d['attempt']})",
    "TaskHeartbeat": lambda d: "",  # a lease renewal every few seconds: noise in a log
    "TaskLeaseExpired": lambda d: "the lease expired; the task will be claimed again",
    "TaskLeaseReleased": lambda d: f"{d['reason']}: its lease is released; the task will be claimed again",
    "ApprovalRequested": lambda d: "",  # the waiting lines of Follower._waiting say it, and more
    "ApprovalVoteCast": lambda d: _vote(d, d["approval_id"]),
    "ApprovalDecided": lambda d: (
        (f"{_vote(d['vote'], d['approval_id'])}: " if d.get("vote") else "")
        + f"approval {d['approval_id']} {d['outcome']}"
    ),
    "ApprovalTimedOut": lambda d: f"approval {d['approval_id']} timed out",
    "ApprovalEscalated": lambda d: f"approval {d['approval_id']} escalated to {', '.join(d['approvers'])}",
    "WorkflowOperationRecorded": _operation,
    "PolicyDecided": _policy,
    "WorkflowSleepStarted": lambda d: f"sleeping until {d['until']}",
    "SignalWaitStarted": lambda d: (
        f"waiting for signal {d['name']}" + (f" until {d['until']}" if d.get("until") else "")
    ),
    "SignalConsumed": lambda d: f"signal {d['name']} received",
    "TaskSignalled": lambda d: f"signal {d['name']} sent by {d['by']}",
    "TaskRetryScheduled": lambda d: f"attempt {d['attempt']} failed ({brief(d['error'])}); retry at {d['not_before']}",
    "TaskCompleted": lambda d: "completed",
    "TaskFailed": lambda d: f"failed: {brief(d['error'])}",
    "TaskCancelled": lambda d: f"cancelled by {d['by']}" + (f": {d['reason']}" if d.get("reason") else ""),
    "TaskTimedOut": lambda d: "timed out",
    "WorkflowNonDeterministic": lambda d: f"parked: {_divergence(d)}",
    "TaskResumed": lambda d: f"resumed by {d['by']}",
}
