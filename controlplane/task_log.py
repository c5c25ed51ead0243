"""What the replay and audit commands read from the log, and the connection they read it on: a task's
history, every task of an org folded in one pass, and the task as a runner receives it. Reads go
straight to JetStream by batched direct get (``core.log.reader``): no consumer is left on the server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import msgspec

from core.domain.events import decode_event
from core.domain.history import state_at, why_absent
from core.domain.ids import validate_token
from core.domain.records import RecordedEvent
from core.domain.subjects import EVENTS_PREFIX, aggregate_subject
from core.domain.task import Task, TaskState
from core.domain.task_decider import TASK
from core.log.reader import LogReader, Progress
from core.log.store import JetStreamEventStore
from gateway.views import task_document

log = logging.getLogger(__name__)

BULK_READ_BATCH = 2000
"""Events per direct-get request when a command reads a whole org."""

_document = msgspec.json.Encoder()


class TaskNotFound(ValueError):
    """The org has no such task (or it did not exist yet at the sequence asked for)."""


async def _quiet(error: Exception) -> None:
    log.debug("nats: %r", error)


async def connect(url: str) -> JetStreamEventStore:
    """A store on a connection made for one command: it gives up after one failed reconnect instead
    of retrying forever, so an unreachable server is an error, not a hang. Nothing is provisioned."""
    return await JetStreamEventStore.connect(
        url,
        provision=False,
        name="controlplane-replay",
        connect_timeout=3,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        error_cb=_quiet,
    )


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[JetStreamEventStore]:
    store = await connect(url)
    try:
        yield store
    finally:
        await store.close()


async def task_history(store: JetStreamEventStore, org: str, task_id: str) -> list[RecordedEvent]:
    history = await store.read_subject(aggregate_subject(org, "task", task_id))
    if not history:
        raise TaskNotFound(f"no task {task_id} in org {org}")
    return history


async def current_task(store: JetStreamEventStore, org: str, task_id: str) -> tuple[Task, int, int]:
    """The task now, the sequence of its last event and how many events it has."""
    history = await task_history(store, org, task_id)
    task, seq = state_at(history)
    if task is None:
        raise TaskNotFound(f"task {task_id} in org {org}: {why_absent(history, None)}")
    return task, seq, len(history)


def runner_view(task: Task, seq: int) -> dict[str, Any]:
    """The task object exactly as a runner receives it from the gateway (JSON, times as strings)."""
    return msgspec.json.decode(_document.encode(task_document(task, seq)))  # type: ignore[no-any-return]


class FoldedTask(msgspec.Struct):
    state: TaskState
    seq: int
    events: int


async def fold_org_tasks(reader: LogReader, org: str, progress: Progress | None = None) -> dict[str, FoldedTask]:
    """Every task of ``org`` folded to its current state, in one pass over the org's task events."""
    tasks: dict[str, FoldedTask] = {}
    evolve = TASK.evolve
    subject_filter = f"{EVENTS_PREFIX}.{validate_token(org, 'org')}.task.>"
    async with aclosing(reader.batches(subject_filter, batch=BULK_READ_BATCH, progress=progress)) as batches:
        async for batch in batches:
            for msg in batch:
                headers: dict[str, str] = msg.headers  # type: ignore[assignment]
                seq = int(headers["Nats-Sequence"])
                task_id = headers["Nats-Subject"].rpartition(".")[2]
                try:
                    event = decode_event(msg.data)
                except ValueError as exc:  # an unknown type or version, or a payload that no longer validates
                    raise ValueError(
                        f"seq {seq} ({headers['Nats-Subject']}) cannot be read by this code: {exc}"
                    ) from exc
                folded = tasks.get(task_id)
                if folded is None:
                    tasks[task_id] = FoldedTask(evolve(None, event), seq, 1)
                else:
                    folded.state = evolve(folded.state, event)
                    folded.seq = seq
                    folded.events += 1
    return tasks
