"""The timer reconciler: ``controlplane timers reconcile``. Timers are a function of state, so every timer
an open task, a live worker or a live schedule needs can be armed again from the log, after an arming
that failed past its commit (the store logs it) or a stream restored from a backup. The read model names
the candidates; each one's state is folded from the log, which decides."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

import asyncpg
import msgspec
import uvloop

from controlplane.connection import database_url_argument, nats_url_argument
from controlplane.progress import progress_bar
from core.domain.ids import validate_token
from core.log.handler import CommandHandler
from core.log.reader import Progress
from core.log.store import JetStreamEventStore
from projections.read import ReadModel

log = logging.getLogger(__name__)

RECONCILER_ACTOR = "system:reconciler"


class Reconciled(msgspec.Struct, frozen=True):
    tasks: int
    workers: int
    schedules: int
    armed: tuple[str, ...]
    """Schedule subjects armed again."""


async def reconcile(
    handler: CommandHandler, read_model: ReadModel, *, org: str | None = None, progress: Progress | None = None
) -> Reconciled:
    """Arm every timer that an open task, a live worker or a live schedule (of ``org``, or of every
    org) needs and the log does not hold."""
    open_tasks, _ = await read_model.open_tasks()
    candidates = [(task_org, "task", task.id) for task_org, task, _ in open_tasks]
    candidates += [(worker_org, "worker", worker_id) for worker_org, worker_id in await read_model.live_workers()]
    candidates += [(owner, "schedule", schedule_id) for owner, schedule_id in await read_model.live_schedules()]
    if org is not None:
        candidates = [candidate for candidate in candidates if candidate[0] == org]
    armed: list[str] = []
    for done, (aggregate_org, aggregate, aggregate_id) in enumerate(candidates, start=1):
        subjects = await handler.rearm(aggregate_org, aggregate, aggregate_id, actor=RECONCILER_ACTOR)
        for subject in subjects:
            log.warning("re-armed timer %s", subject)
        armed += subjects
        if progress is not None:
            progress(done, len(candidates))
    kinds = Counter(aggregate for _, aggregate, _ in candidates)
    return Reconciled(tasks=kinds["task"], workers=kinds["worker"], schedules=kinds["schedule"], armed=tuple(armed))


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
    timers = commands.add_parser("timers", help="durable timers").add_subparsers(dest="timers_command", required=True)
    command = timers.add_parser(
        "reconcile",
        help="arm again every timer an open task, live worker or schedule needs and the log does not hold",
        description="Arm again every timer (lease expiry, approval timeout and escalation, retry, deadline, "
        "worker liveness, a schedule's next fire) that an open task, a live worker or a live schedule needs and "
        "the log does not hold. Safe to run at "
        "any time: a timer armed twice fires twice, and the second firing changes nothing.",
        epilog="examples:\n  controlplane timers reconcile --nats-url nats://127.0.0.1:4222 "
        "--database-url postgresql://…\n  controlplane timers reconcile --org acme   # one org only",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--org", help="only this org (default: every org)")
    nats_url_argument(command)
    database_url_argument(command, login="gateway")
    command.set_defaults(run=lambda args: uvloop.run(_reconcile(args)))


async def _reconcile(args: argparse.Namespace) -> int:
    if not args.database_url:
        raise ValueError("the read model names the candidates: give --database-url or DATABASE_URL")
    org = validate_token(args.org, "org") if args.org else None
    store = await JetStreamEventStore.connect(args.nats_url, provision=False)
    pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
    read_model = ReadModel(pool)
    try:
        progress = progress_bar("reconcile") if sys.stderr.isatty() else None
        done = await reconcile(CommandHandler(store), read_model, org=org, progress=progress)
    finally:
        await read_model.close()
        await pool.close()
        await store.close()
    print(
        f"checked {done.tasks} open task(s), {done.workers} live worker(s) and {done.schedules} schedule(s); "
        f"re-armed {len(done.armed)} timer(s)" + "".join(f"\n  {subject}" for subject in done.armed)
    )
    return 0
