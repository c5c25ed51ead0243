"""Replay of a task's history, the pure part: the state at any stream sequence, forks (what to copy, and
the rule that writes a copy) and diffs; the timeline a person reads is ``core.domain.timeline``'s. No
I/O: callers read :class:`RecordedEvent` lists from the log and hand them in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import msgspec

from core.domain.commands import Command, ForkTask
from core.domain.decider import Decider, DecisionContext, no_timers
from core.domain.errors import AlreadyExists
from core.domain.events import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    ApprovalTimedOut,
    ApprovalVoteCast,
    Event,
    TaskSubmissionDenied,
    TaskSubmitted,
)
from core.domain.ids import validate_token
from core.domain.records import RecordedEvent
from core.domain.task import Task, TaskState, task_id_of_approval
from core.domain.task_decider import TASK

_json = msgspec.json.Encoder(order="sorted").encode


# --- state at a sequence --------------------------------------------------------------------------


def state_at(history: Sequence[RecordedEvent], seq: int | None = None) -> tuple[TaskState, int]:
    """The task as the log showed it when stream sequence ``seq`` was the newest (now when None), and
    the sequence of the last event folded (0 if none).

    A command's events are appended as one atomic batch, so nobody ever saw half of one: a ``seq``
    that falls inside a command (a fork's copies, or in logs recorded before the deciding vote moved into
    ``ApprovalDecided``, a vote and the decision it caused) gives the state before it."""
    state: TaskState = None
    last = 0
    for command in commands(history):
        if seq is not None and command[-1].seq > seq:
            break
        for item in command:
            state = TASK.evolve(state, item.event)
        last = command[-1].seq
    return state, last


def commands(history: Sequence[RecordedEvent]) -> Iterator[Sequence[RecordedEvent]]:
    """The history cut into commands: consecutive events sharing a command id (a fired timer, which has
    none, stands alone)."""
    start = 0
    for index in range(1, len(history) + 1):
        if (
            index == len(history)
            or history[index].command_id is None
            or history[index].command_id != history[start].command_id
        ):
            yield history[start:index]
            start = index


# --- fork -----------------------------------------------------------------------------------------


class ForkRefused(ValueError):
    """The fork asked for cannot be made (the task did not exist yet at that sequence)."""


class ForkPlan(msgspec.Struct, frozen=True):
    source: str
    task_id: str
    requested_seq: int
    seq: int
    """The last source event copied: ``requested_seq`` moved back to where no lease is held and no
    command is cut in half."""
    events: tuple[Event, ...]
    state: Task
    """What the fork folds to: the source's state at ``seq``, with the fork's ids."""


_APPROVAL_EVENTS = (ApprovalRequested, ApprovalVoteCast, ApprovalDecided, ApprovalTimedOut, ApprovalEscalated)


def plan_fork(history: Sequence[RecordedEvent], *, task_id: str, at_seq: int, queue: str | None = None) -> ForkPlan:
    """The events that make task ``task_id`` a copy of the task of ``history`` as it was at ``at_seq``.

    What is copied: the source's events up to the *cut*, the latest event at or before ``at_seq``
    after which (a) no lease is held, because a lease belongs to a worker that is not running the
    fork and would strand it until the lease timer, which the fork does not inherit; and (b) no
    command is cut in half (events sharing a command id, such as a fork's copies).
    The fork is written in atomic batches, so its own history groups the copies by batch: ``state
    --at`` on a fork (and a fork of a fork) stops only at the ends of those batches.
    What changes in the copies: the task id; approval ids (``<source>-<n>`` becomes ``<fork>-<n>``, so
    the fork's approvals can be decided through the API); the submit's ``metadata.forked_from =
    {task, seq}`` (``seq`` is the cut) and, if given, its ``queue`` (so that a what-if runner, not the
    production one, claims it). Everything else (payload, journal, approvals, retries, times) is as
    the source recorded it, so the fork folds to the source's state at the cut."""
    count = _copied(history, at_seq)
    if count == 0:
        raise ForkRefused(f"nothing to fork: {why_absent(history, at_seq)}")
    copied = history[:count]
    source = TASK.fold(item.event for item in copied)
    assert source is not None
    cut_seq = copied[-1].seq
    events = tuple(_renamed(item.event, source.id, task_id, cut_seq=cut_seq, queue=queue) for item in copied)
    state = TASK.fold(events)
    assert state is not None
    return ForkPlan(source.id, task_id, at_seq, cut_seq, events, state)


def why_absent(history: Sequence[RecordedEvent], seq: int | None) -> str:
    """Why a task with this history has no state at ``seq`` (None: now)."""
    state: TaskState = None
    for command in commands(history):
        for item in command:
            state = TASK.evolve(state, item.event)
        if state is not None:
            return f"it did not exist yet at seq {seq}: it was created at seq {command[-1].seq}"
    return "it was never created: its submission was denied"


def _copied(history: Sequence[RecordedEvent], at_seq: int) -> int:
    """How many events to copy: whole commands up to ``at_seq``, ending where no lease is held. The
    submit always qualifies."""
    copied = position = 0
    state: TaskState = None
    for command in commands(history):
        if command[-1].seq > at_seq:
            break
        for item in command:
            state = TASK.evolve(state, item.event)
        position += len(command)
        if state is not None and state.lease is None:
            copied = position
    return copied


def _renamed(event: Event, source: str, task_id: str, *, cut_seq: int, queue: str | None) -> Event:
    if isinstance(event, TaskSubmissionDenied):
        return msgspec.structs.replace(event, task_id=task_id)
    if isinstance(event, TaskSubmitted):
        return msgspec.structs.replace(
            event,
            task_id=task_id,
            queue=queue or event.queue,
            metadata={**event.metadata, "forked_from": {"task": source, "seq": cut_seq}},
        )
    if isinstance(event, _APPROVAL_EVENTS):
        owner = task_id_of_approval(event.approval_id)
        if owner == source:
            renamed = validate_token(task_id + event.approval_id[len(source) :], "approval id of the fork")
            return msgspec.structs.replace(event, approval_id=renamed)
    return event


def decide_fork(state: TaskState, command: Command, ctx: DecisionContext) -> Sequence[Event]:
    """A part of a fork lands only on the fork exactly as the parts before it left it (the first part
    on no task at all): never on another task, nor on a fork that changed while it was written (a
    worker may claim it between two parts)."""
    assert isinstance(command, ForkTask)
    if state != command.before:
        if command.before is None:
            raise AlreadyExists(f"task {command.task_id} already exists in org {ctx.org}")
        raise AlreadyExists(
            f"task {command.task_id} in org {ctx.org} is not the fork its earlier parts wrote: "
            "it changed while the fork was written"
        )
    return command.events


FORK = Decider[TaskState](
    aggregate=TASK.aggregate,
    commands=(ForkTask,),
    initial=None,
    decide=decide_fork,
    evolve=TASK.evolve,
    # A part arms no timer: one already due would fire between two parts and change the task under the
    # next. The whole fork written, the timers its state wants are armed (CommandHandler.rearm).
    timers=no_timers,
    aggregate_id=lambda command: command.task_id,  # type: ignore[attr-defined]
)
"""Writes forks onto the task aggregate: the task's own evolve, the rule above, no timers."""


# --- diff -----------------------------------------------------------------------------------------


class JournalPair(msgspec.Struct, frozen=True):
    index: int
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    same: bool


class FieldPair(msgspec.Struct, frozen=True):
    name: str
    a: Any
    b: Any
    same: bool


class TaskDiff(msgspec.Struct, frozen=True):
    a: str
    b: str
    fields: tuple[FieldPair, ...]
    journal: tuple[JournalPair, ...]
    first_divergence: str | None
    """``"payload"``, ``"journal[3]"``, ``"status"``, …: where the two runs first part; None if they agree."""


def diff_tasks(a: Task, b: Task) -> TaskDiff:
    """Two tasks side by side: their payloads, journals (operation by operation) and outcomes. An
    approval in a journal compares by what was asked and decided, not by id, so a fork and its source
    agree on it."""
    journal_a, journal_b = _journal_view(a), _journal_view(b)
    pairs = []
    for index in range(max(len(journal_a), len(journal_b))):
        left = journal_a[index] if index < len(journal_a) else None
        right = journal_b[index] if index < len(journal_b) else None
        pairs.append(JournalPair(index, left, right, left == right))
    before = [_field("payload", a.payload, b.payload)]
    after = [
        _field("status", a.status, b.status),
        _field("result", a.result, b.result),
        _field("error", a.error, b.error),
        _field("retries", a.retries, b.retries),
        _field("parked", a.parked, b.parked),
    ]
    first = next(
        (
            name
            for name, same in (
                *((f.name, f.same) for f in before),
                *((f"journal[{p.index}]", p.same) for p in pairs),
                *((f.name, f.same) for f in after),
            )
            if not same
        ),
        None,
    )
    return TaskDiff(a.id, b.id, (*before, *after), tuple(pairs), first)


def _field(name: str, a: Any, b: Any) -> FieldPair:
    return FieldPair(name, a, b, _json(a) == _json(b))


def _journal_view(task: Task) -> list[dict[str, Any]]:
    views = []
    for entry in task.journal:
        view: dict[str, Any] = {"kind": entry.kind, "name": entry.name, "result": entry.result}
        if entry.kind == "approval":
            approval = task.approval(str(entry.result))
            view["result"] = (
                None
                if approval is None
                else {"reason": approval.reason, "quorum": approval.quorum, "status": approval.status}
            )
        views.append(msgspec.json.decode(_json(view)))
    return views
