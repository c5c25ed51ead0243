"""What each kind of notification channel receives, from the message ``core.domain.notification_messages``
composes: a Slack incoming webhook's ``{"text", "blocks"}``, an e-mail, and the JSON body a ``webhook``
channel gets signed (``NotificationBody``). The notifier (``integrations.notify``) sends them."""

from __future__ import annotations

from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import msgspec

from core.domain.events import NotificationTrigger
from core.domain.notification_messages import Happening, Message
from core.domain.notifications import Channel, Rule
from core.domain.records import RecordedEvent


def message_id(notification: str) -> str:
    """The e-mail ``Message-ID`` of a notification: the same on every attempt, so a mail system that
    sees it twice can drop the second. The id already derives from the org; short enough that the header
    is never folded."""
    return f"<{notification}@controlplane>"


class NotificationTask(msgspec.Struct, frozen=True):
    id: str
    type: str
    queue: str
    environment: str | None
    workflow: str | None
    status: str


class NotificationApproval(msgspec.Struct, frozen=True):
    id: str
    kind: str
    reason: str
    details: Any
    approvers: tuple[str, ...]
    quorum: int
    expires_at: datetime | None
    escalated: bool


class NotificationBody(msgspec.Struct, frozen=True):
    """What a ``webhook`` channel receives, all of it covered by the signature."""

    notification_id: str
    org: str
    trigger: NotificationTrigger
    rule_id: str
    channel: str
    source_seq: int
    source_type: str
    title: str
    text: str
    link: str
    task_link: str
    task: NotificationTask
    approval: NotificationApproval | None


def webhook_body(
    org: str, notification: str, rule: Rule, source: RecordedEvent, what: Happening, msg: Message
) -> bytes:
    task, approval = what.task, what.approval
    body = NotificationBody(
        notification_id=notification,
        org=org,
        trigger=what.trigger,
        rule_id=rule.id,
        channel=rule.channel,
        source_seq=source.seq,
        source_type=str(type(source.event).__struct_config__.tag),
        title=msg.title,
        text="\n".join(msg.lines),
        link=msg.link,
        task_link=msg.task_link,
        task=NotificationTask(
            id=task.id,
            type=task.task_type,
            queue=task.queue,
            environment=task.environment,
            workflow=None if task.workflow is None else task.workflow.name,
            status=task.status,
        ),
        approval=None
        if approval is None
        else NotificationApproval(
            id=approval.id,
            kind=approval.kind,
            reason=approval.reason,
            details=approval.details,
            approvers=approval.approvers,
            quorum=approval.quorum,
            expires_at=approval.expires_at,
            escalated=approval.escalated,
        ),
    )
    return msgspec.json.encode(body)


def _mrkdwn(text: str) -> str:
    """Text as Slack shows it literally: its three control characters escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(msg: Message) -> bytes:
    """A Slack incoming webhook's ``{"text", "blocks"}``: ``text`` for notifications and clients without
    blocks, the blocks with the details and a link to act on."""
    details = "\n".join(_mrkdwn(line) for line in msg.lines if not line.startswith("Open: "))
    return msgspec.json.encode(
        {
            "text": f"{msg.title}\n{msg.link}",
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_mrkdwn(msg.title)}*"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": details}},
                {"type": "section", "text": {"type": "mrkdwn", "text": f"<{msg.link}|Open in the console>"}},
            ],
        }
    )


def email_message(org: str, notification: str, channel: Channel, msg: Message, sent_at: datetime) -> EmailMessage:
    assert channel.smtp is not None
    email = EmailMessage()
    email["From"] = channel.smtp.sender
    email["To"] = ", ".join(channel.smtp.recipients)
    email["Subject"] = msg.title
    email["Date"] = format_datetime(sent_at)
    email["Message-ID"] = message_id(notification)
    email["X-CP-Notification-Id"] = notification
    email.set_content("\n".join(msg.lines) + "\n")
    return email
