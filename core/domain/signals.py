"""Signals to a workflow (``POST /v1/tasks/{id}/signals``, ``ctx.wait_for_signal``): who may send one,
how many a task keeps for waits that have not come yet, and what a wait does with them (takes the
earliest kept one of its name, else waits, with an optional timeout).

The task aggregate (``core/domain/task.py``) keeps its signals and its wait, checks what the task
itself requires (not ended, the lease holder at the next journal position) and applies these. Pure:
no I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from core.domain.commands import SignalTask, WaitForSignal
from core.domain.decider import DecisionContext, Timer
from core.domain.errors import InvalidTransition, NotPermitted
from core.domain.events import Event, SignalConsumed, SignalWaitStarted, SignalWaitTimedOut, TaskSignalled

SIGNAL_ROLES = frozenset({"admin", "submitter", "approver"})
MAX_PENDING_SIGNALS = 64
"""Signals a task keeps for waits that have not come yet: each may carry 64 KiB, and the whole task is
one row of the read model, so a flood is refused (409) rather than kept."""


class Signal(msgspec.Struct, frozen=True):
    """A signal the task received and keeps until a wait for its name takes it."""

    number: int
    """Its place among all the signals the task received, from 1: what a ``SignalConsumed`` names."""
    name: str
    payload: Any
    by: str
    at: datetime

    def delivered(self) -> dict[str, Any]:
        """What ``wait_for_signal`` returns, and the journal records, for this signal."""
        return {"name": self.name, "payload": self.payload, "by": self.by, "at": msgspec.to_builtins(self.at)}


class SignalWait(msgspec.Struct, frozen=True):
    """A workflow waiting, at position ``index`` of its journal, for a signal ``name``."""

    index: int
    name: str
    since: datetime
    until: datetime | None
    """When the wait gives up (a timer), None for never."""


def accepted_signal(task_id: str, kept: Sequence[Signal], command: SignalTask, ctx: DecisionContext) -> TaskSignalled:
    """A signal sent to an open task that keeps the signals ``kept``."""
    if not ctx.actor.roles & SIGNAL_ROLES:
        raise NotPermitted(f"sending a signal needs one of the roles {sorted(SIGNAL_ROLES)}")
    if len(kept) >= MAX_PENDING_SIGNALS:
        raise InvalidTransition(
            f"task {task_id} already keeps {len(kept)} signals no wait has taken; "
            "send more once its workflow has consumed some"
        )
    return TaskSignalled(at=ctx.now, name=command.name, payload=command.payload, by=ctx.actor.id)


def taken_or_awaited(kept: Sequence[Signal], command: WaitForSignal, ctx: DecisionContext) -> Event:
    """The earliest kept signal of the name is taken at once (the lease stays); with none, the wait
    starts and the lease is released."""
    earliest = first_signal(kept, command.name)
    if earliest is not None:
        return SignalConsumed(
            at=ctx.now,
            index=command.index,
            name=command.name,
            number=earliest.number,
            worker_id=command.worker_id,
            lease_id=command.lease_id,
        )
    until = None if command.timeout_seconds is None else ctx.now + timedelta(seconds=command.timeout_seconds)
    return SignalWaitStarted(
        at=ctx.now,
        index=command.index,
        name=command.name,
        until=until,
        worker_id=command.worker_id,
        lease_id=command.lease_id,
    )


def first_signal(kept: Sequence[Signal], name: str) -> Signal | None:
    return next((signal for signal in kept if signal.name == name), None)


def wait_timer(wait: SignalWait | None) -> list[Timer]:
    """The timeout of a wait that has one."""
    if wait is None or wait.until is None:
        return []
    return [Timer(f"signal-wait-{wait.index}", SignalWaitTimedOut(at=wait.until, index=wait.index))]
