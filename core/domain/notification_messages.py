"""What a notification says: what a log event means for people (``happening``), which of the org's rules
send it (``matching_rules``) and the message they read (``compose``), with links into the console. The
channels and rules themselves, and the record of each notification, are ``core.domain.notifications``'.
Pure: no I/O, no clock."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from core.domain.approvals import Approval
from core.domain.events import (
    ApprovalEscalated,
    ApprovalRequested,
    ApprovalTimedOut,
    Event,
    NotificationTrigger,
    TaskFailed,
    TaskSubmitted,
    WorkflowNonDeterministic,
)
from core.domain.notifications import NotificationSettings, Rule
from core.domain.task import Task, TaskState


class Happening(msgspec.Struct, frozen=True):
    """What a log event means for people: a trigger on a task (and its approval)."""

    trigger: NotificationTrigger
    task: Task
    approval: Approval | None = None


def happening(event: Event, before: TaskState, after: TaskState) -> Happening | None:
    """What ``event`` did, given the task just before and just after it; None when it is nothing to tell
    anyone (another type, or a timer that changed nothing because its approval or task had moved on). A
    submit the policy gates asks for approval in ``TaskSubmitted`` itself."""
    if after is None:
        return None
    match event:
        case TaskSubmitted() if after.approvals and before is None:
            return Happening("approval_requested", after, after.approvals[0])  # the submit policy's gate
        case ApprovalRequested():
            approval = after.approval(event.approval_id)
            if approval is not None and (before is None or before.approval(event.approval_id) is None):
                return Happening("approval_requested", after, approval)
        case ApprovalEscalated():
            approval, earlier = after.approval(event.approval_id), _approval(before, event.approval_id)
            newly = earlier is not None and not earlier.escalated
            if approval is not None and approval.status == "pending" and approval.escalated and newly:
                return Happening("approval_escalated", after, approval)
        case ApprovalTimedOut():
            approval, earlier = after.approval(event.approval_id), _approval(before, event.approval_id)
            was_pending = earlier is not None and earlier.status == "pending"
            if approval is not None and approval.status == "timed_out" and was_pending:
                return Happening("approval_timed_out", after, approval)
        case TaskFailed():
            if after.status == "failed" and (before is None or before.status != "failed"):
                return Happening("task_failed", after)
        case WorkflowNonDeterministic():
            if after.parked is not None and (before is None or before.parked is None):
                return Happening("task_parked", after)
    return None


def _approval(task: TaskState, approval_id: str) -> Approval | None:
    return None if task is None else task.approval(approval_id)


def matching_rules(settings: NotificationSettings, what: Happening) -> list[Rule]:
    """The rules, by id, that send ``what``: its trigger is one of the rule's, and each filter the rule
    sets (queue, environment, workflow name) is the task's."""
    task = what.task
    workflow = None if task.workflow is None else task.workflow.name
    return [
        rule
        for rule in settings.listed_rules()
        if what.trigger in rule.on
        and rule.channel in settings.channels
        and rule.queue in (None, task.queue)
        and rule.environment in (None, task.environment)
        and rule.workflow in (None, workflow)
    ]


class Message(msgspec.Struct, frozen=True):
    """A notification as people read it, before a channel formats it."""

    title: str
    lines: tuple[str, ...]
    link: str
    """The console page to act on: the approval in the inbox, or the run."""
    task_link: str


DETAILS_PREVIEW = 300
_TITLES: dict[str, str] = {
    "approval_requested": "Approval requested",
    "approval_escalated": "Reminder: approval still waiting (escalated)",
    "approval_timed_out": "Approval timed out",
    "task_failed": "Task failed",
    "task_parked": "Workflow parked",
}


def approval_link(console_url: str, approval_id: str) -> str:
    """The approval in the console's inbox: its row carries ``id="approval-<id>"``."""
    return f"{console_url.rstrip('/')}/console/approvals#approval-{approval_id}"


def task_link(console_url: str, task_id: str) -> str:
    return f"{console_url.rstrip('/')}/console/tasks/{task_id}"


def compose(org: str, what: Happening, console_url: str, preview: int = DETAILS_PREVIEW) -> Message:
    """What waits (task type, queue, environment, workflow; the approval's reason and a short view of its
    details), for whom (the approvers), until when (the approval's expiry), and where to act."""
    task, approval = what.task, what.approval
    where = f"queue {task.queue}" + (f", environment {task.environment}" if task.environment else "")
    workflow = f", workflow {task.workflow.name}" if task.workflow is not None else ""
    lines = [f"Task {task.id} ({task.task_type}) in org {org}, {where}{workflow}."]
    if approval is not None:
        subject = approval.reason
        lines.append(f"Reason: {approval.reason}")
        if approval.details is not None:
            lines.append(f"Details: {_preview(approval.details, preview)}")
        lines.append(f"Waits for: {', '.join(approval.approvers)} ({approval.quorum} approval(s) needed)")
        lines.append(f"Until: {_when(approval.expires_at)}")
        if what.trigger == "approval_escalated" and approval.escalation is not None:
            lines.append(f"Escalated to: {', '.join(approval.escalation.approvers)}")
        if what.trigger == "approval_timed_out":
            lines.append("Nobody decided in time: the approval is closed as timed out.")
        link = approval_link(console_url, approval.id)
    else:
        subject = task.task_type
        if what.trigger == "task_failed":
            lines.append(f"Error: {_preview(task.error, preview)}")
        else:
            lines.append(f"Parked: {task.parked}. Fix the workflow, then resume the task.")
        link = task_link(console_url, task.id)
    lines.append(f"Open: {link}")
    return Message(
        title=f"[{org}] {_TITLES[what.trigger]}: {_one_line(subject, 120)}",
        lines=tuple(lines),
        link=link,
        task_link=task_link(console_url, task.id),
    )


_json = msgspec.json.Encoder(order="sorted").encode


def _preview(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else _json(value).decode()
    return _one_line(text, limit)


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _when(moment: datetime | None) -> str:
    return "no deadline" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")
