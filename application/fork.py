"""Forking a task: writing a copy of a task's history up to a point as a new task (``controlplane fork``).

What to copy is pure (``core.domain.history.plan_fork``); writing it is the command handler's, as for
any command: each part of the fork is a ``ForkTask`` command, appended with optimistic concurrency
and decided by ``core.domain.history.FORK``, which lands a part only on the fork as the parts before it
left it (the first part on no task at all). So a fork never lands on an existing task, and a part
already written (a retry, or a run that failed half-way) is answered with its outcome and appended
again nowhere. Once every part is written, the handler arms the timers the fork's state wants
(approval timeouts, the deadline, a retry's wake-up) that the log does not hold; one already due
fires at once."""

from __future__ import annotations

import hashlib

import msgspec

from core.domain.commands import Actor, ForkTask
from core.domain.errors import AlreadyExists
from core.domain.history import FORK, ForkPlan
from core.domain.ids import validate_token
from core.domain.task import TaskState
from core.log.handler import CommandHandler

FORK_BATCH = 500
"""Events per part of a fork, one atomic append each (nats-server takes at most 1,000 messages in an
atomic batch)."""
FORK_ACTOR = Actor("system:fork")
_PART_SUFFIX = len("-9999999")
"""Room a part's command id needs after the fork's: its offset, up to ten million events."""


class Forked(msgspec.Struct, frozen=True):
    last_seq: int
    """The stream sequence of the fork's last event."""
    appended: int
    """Events appended now: fewer than the plan's when an earlier run wrote some parts."""


def fork_command_id(task_id: str) -> str:
    """The default command id of a fork to ``task_id``: the same for every run, so running a fork
    again resumes it. Each part's id adds the part's first event index (``-<offset>``), which a task
    id near the 63-character limit leaves no room for: such an id is hashed."""
    command_id = f"fork-{task_id}"
    if len(command_id) > 63 - _PART_SUFFIX:
        command_id = f"fork-{hashlib.blake2b(task_id.encode(), digest_size=16).hexdigest()}"
    return command_id


async def fork_task(handler: CommandHandler, org: str, plan: ForkPlan, *, command_id: str) -> Forked:
    """Write ``plan`` as task ``plan.task_id`` of ``org``, in parts of up to :data:`FORK_BATCH` events,
    part ``n`` with command id ``<command_id>-<its first event's index>``.

    Raises ``AlreadyExists`` when the task exists and is not this fork (or is a fork that changed while
    it was written): nothing more is appended then. Running the same fork with the same command id
    appends only what is missing (nothing once it is complete)."""
    validate_token(command_id, "command id")
    before: TaskState = None
    appended = last_seq = 0
    for offset in range(0, len(plan.events), FORK_BATCH):
        part = plan.events[offset : offset + FORK_BATCH]
        command = ForkTask(task_id=plan.task_id, events=part, before=before)
        outcome = await handler.handle(org, command, actor=FORK_ACTOR, command_id=f"{command_id}-{offset}")
        if outcome.duplicate and tuple(item.event for item in outcome.events) != part:
            raise AlreadyExists(
                f"task {plan.task_id} already exists in org {org}: command id {command_id} wrote another fork"
            )
        appended += 0 if outcome.duplicate else len(part)
        last_seq = outcome.seq
        before = FORK.fold(part, before)
    await handler.rearm(org, FORK.aggregate, plan.task_id, actor=FORK_ACTOR.id)
    return Forked(last_seq=last_seq, appended=appended)
