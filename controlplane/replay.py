"""CLI commands for history, state, verify, export, audit, fork, diff: replay and audit of the log.

Each only reads the log, except ``fork``, which writes a new task (never onto an existing one) through
the command handler (``application.fork``). What they read, and the connection they read it on (one
that fails fast when the server cannot be reached), is ``controlplane.task_log``'s; the audit export
is ``controlplane.export``'s."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import msgspec
import uvloop

from application.fork import fork_command_id, fork_task
from application.policy import pushed_bundle
from controlplane.connection import nats_url_argument
from controlplane.export import export_org
from controlplane.progress import progress_bar
from controlplane.task_log import (
    FoldedTask,
    TaskNotFound,
    current_task,
    fold_org_tasks,
    opened,
    runner_view,
    task_history,
)
from core.domain.audit import AuditChain, AuditReport, verify_export
from core.domain.errors import AlreadyExists
from core.domain.events import PolicyBundlePushed
from core.domain.history import ForkRefused, TaskDiff, diff_tasks, plan_fork, state_at, why_absent
from core.domain.ids import new_id, validate_token
from core.domain.policy_set import POLICY_AGGREGATE, POLICY_SET_ID
from core.domain.records import rfc3339
from core.domain.subjects import aggregate_subject
from core.domain.task import Task
from core.domain.timeline import short, task_timeline
from core.log.event_store import StoreError
from core.log.handler import CommandHandler
from core.log.reader import Progress
from core.log.store import JetStreamEventStore
from gateway.views import task_document
from policies_wasm import default_bundle
from runners.registry import Registry
from runners.verify import DEFAULT_TIMEOUT_SECONDS, SameBundles, Verification, verify_task

DEFAULT_WORKFLOWS = "runners.examples:EXAMPLES"

_document = msgspec.json.Encoder()


def _progress(args: argparse.Namespace, label: str) -> Progress | None:
    wanted = args.progress if args.progress is not None else sys.stderr.isatty()
    return progress_bar(label) if wanted else None


async def _history(args: argparse.Namespace) -> int:
    org, task_id = validate_token(args.org, "org"), validate_token(args.task, "task id")
    async with opened(args.nats_url) as store:
        history = await task_history(store, org, task_id)
    entries = task_timeline(history)
    if args.json:
        print(msgspec.json.format(_document.encode(entries)).decode())
        return 0
    actor_width = max((len(entry.actor or "-") for entry in entries), default=5)
    print(f"{'SEQ':>8}  {'TIME':<24}  {'ACTOR':<{actor_width}}  {'EVENT':<26}  SUMMARY")
    for entry in entries:
        summary = entry.summary if entry.changed else f"{entry.summary} (no effect)"
        print(f"{entry.seq:>8}  {entry.time:<24}  {entry.actor or '-':<{actor_width}}  {entry.type:<26}  {summary}")
    return 0


async def _state(args: argparse.Namespace) -> int:
    org, task_id = validate_token(args.org, "org"), validate_token(args.task, "task id")
    async with opened(args.nats_url) as store:
        history = await task_history(store, org, task_id)
    task, seq = state_at(history, args.at)
    if task is None:
        raise TaskNotFound(f"task {task_id} in org {org}: {why_absent(history, args.at)}")
    document = task_document(task, seq)
    if args.json:
        print(msgspec.json.format(_document.encode(document)).decode())
    else:
        _print_state(task, seq, args.at)
    return 0


def _print_state(task: Task, seq: int, requested: int | None) -> None:
    at = f"seq {seq}" if requested is None or requested == seq else f"seq {seq} (last event at or before {requested})"
    lease = (
        "-"
        if task.lease is None
        else f"{task.lease.id} of {task.lease.worker_id} until {rfc3339(task.lease.expires_at)}"
    )
    workflow = "-"
    if task.workflow is not None:
        version = task.workflow.version
        workflow = f"{task.workflow.name} v{version}" if version is not None else f"{task.workflow.name} (any version)"
    rows = [
        ("task", f"{task.id} in org {task.org}, at {at}"),
        (
            "status",
            f"{task.status}, priority {task.priority}, queue {task.queue}, retries {task.retries}/{task.max_retries}",
        ),
        ("workflow", workflow),
        ("lease", lease),
        ("parked", task.parked or "-"),
        ("not before", "-" if task.not_before is None else rfc3339(task.not_before)),
        ("payload", short(task.payload)),
        ("result", short(task.result)),
        ("error", short(task.error)),
    ]
    for name, value in rows:
        print(f"{name:<11} {value}")
    for entry in task.journal:
        print(f"{'journal':<11} {entry.index:>3} {entry.kind:<8} {entry.name!r} -> {short(entry.result, 60)}")
    for approval in task.approvals:
        votes = ", ".join(f"{v.by} {v.decision}" for v in approval.decisions) or "no votes"
        print(
            f"{'approval':<11} {approval.id} {approval.status} (quorum {approval.quorum}; {votes}): {approval.reason!r}"
        )


async def _verify(args: argparse.Namespace) -> int:
    org = validate_token(args.org, "org")
    registry = Registry.load(args.workflows or [DEFAULT_WORKFLOWS])
    async with opened(args.nats_url) as store:
        if args.task is not None:
            task_id = validate_token(args.task, "task id")
            state, seq, events = await current_task(store, org, task_id)
            tasks = {task_id: FoldedTask(state, seq, events)}
        else:
            tasks = await fold_org_tasks(store.reader, org, _progress(args, "read"))
        bundles = None if args.skip_policies else await _policy_bundles(store, org)
    chosen = [
        folded
        for folded in tasks.values()
        if folded.state is not None and (not args.active or not folded.state.is_terminal)
    ]
    progress = _progress(args, "replay")
    total = sum(folded.events for folded in chosen)
    reports: list[Verification] = []
    replayed = 0
    for folded in chosen:
        assert folded.state is not None
        view = runner_view(folded.state, folded.seq)
        reports.append(await verify_task(view, registry, time_limit=args.time_limit, bundles=bundles))
        replayed += folded.events
        if progress is not None:
            progress(replayed, total)
    diverged = [r for r in reports if r.outcome == "divergence"]
    if args.json:
        print(msgspec.json.format(_document.encode(reports)).decode())
    else:
        _print_verifications(reports, verbose=args.verbose or args.task is not None)
        ok = sum(r.outcome == "ok" for r in reports)
        skipped = sum(r.outcome == "skipped" for r in reports)
        print(f"verified {len(reports)} tasks of org {org}: {ok} ok, {len(diverged)} diverged, {skipped} skipped")
    return 1 if diverged else 0


async def _policy_bundles(store: JetStreamEventStore, org: str) -> SameBundles:
    """Every bundle the org's decisions can name: its pushed versions and the shipped bundle."""
    pushed = await store.read_subject(aggregate_subject(org, POLICY_AGGREGATE, POLICY_SET_ID))
    versions = [pushed_bundle(item.event) for item in pushed if isinstance(item.event, PolicyBundlePushed)]
    return SameBundles([*versions, await asyncio.to_thread(default_bundle)])


def _print_verifications(reports: Sequence[Verification], *, verbose: bool) -> None:
    for report in reports:
        if report.outcome != "divergence" and not verbose:
            continue
        mark = {"ok": "ok", "divergence": "DIVERGED", "skipped": "skipped"}[report.outcome]
        print(f"{mark:<9} {report.task_id}  {report.workflow or '-'}  {report.status}: {report.reason}")
        if report.outcome == "divergence":
            print(f"{'':<9} recorded: {short(report.recorded, 200)}")
            print(f"{'':<9} code:     {short(report.code, 200)}")


async def _export(args: argparse.Namespace) -> int:
    org = validate_token(args.org, "org")
    since = _parse_time(args.since) if args.since else None
    async with opened(args.nats_url) as store:
        if args.output is None:
            chain = await _export_to(store, org, sys.stdout.buffer, since, args)
        else:
            # Written beside the target and moved over it when complete: a failed export never
            # destroys an earlier one at the same path.
            partial = args.output.with_name(f"{args.output.name}.partial")
            try:
                with partial.open("wb") as out:
                    chain = await _export_to(store, org, out, since, args)
                partial.replace(args.output)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
    seqs = f" (seq {chain.last_seq} last)" if chain.events else ""
    print(f"exported {chain.events} events of org {org}{seqs}; head {chain.head}", file=sys.stderr)
    return 0


async def _export_to(
    store: JetStreamEventStore, org: str, out: BinaryIO, since: datetime | None, args: argparse.Namespace
) -> AuditChain:
    try:
        chain = await export_org(store.reader, org, out, since=since, progress=_progress(args, "export"))
        out.flush()
    except BrokenPipeError:
        # The reader went away (export | head): say so once; stop Python flushing into the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        raise ValueError("the output was closed before the export finished") from None
    return chain


def _audit_verify(args: argparse.Namespace) -> int:
    if str(args.file) == "-":
        report = verify_export(sys.stdin.buffer, expected_head=args.head)
    else:
        try:
            with args.file.open("rb") as lines:
                report = verify_export(lines, expected_head=args.head)
        except OSError as exc:
            raise ValueError(f"cannot read {args.file}: {exc.strerror}") from exc
    _print_audit(report, args.json, sys.stdout)
    return 0 if report.ok else 1


def _print_audit(report: AuditReport, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(msgspec.json.format(_document.encode(report)).decode(), file=out)
    elif report.problem is None:
        print(f"ok: {report.events} events of org {report.org} in {report.lines} lines; head {report.head}", file=out)
    else:
        print(f"line {report.problem.line}: {report.problem.reason}", file=out)


async def _fork(args: argparse.Namespace) -> int:
    org, source = validate_token(args.org, "org"), validate_token(args.task, "task id")
    task_id = validate_token(args.new_id, "new task id") if args.new_id else new_id()
    queue = validate_token(args.queue, "queue") if args.queue else None
    async with opened(args.nats_url) as store:
        plan = plan_fork(await task_history(store, org, source), task_id=task_id, at_seq=args.at, queue=queue)
        handler = CommandHandler(store)
        try:
            forked = await fork_task(handler, org, plan, command_id=fork_command_id(plan.task_id))
        except AlreadyExists as refused:
            raise ForkRefused(f"{refused.detail}; choose another id with --as") from refused
    last_seq, appended = forked.last_seq, forked.appended
    summary = {
        "task": plan.task_id,
        "source": plan.source,
        "seq": plan.seq,
        "requested_seq": plan.requested_seq,
        "events": len(plan.events),
        "appended": appended,
        "last_seq": last_seq,
        "status": plan.state.status,
        "queue": plan.state.queue,
    }
    if args.json:
        print(msgspec.json.format(_document.encode(summary)).decode())
        return 0
    moved = (
        ""
        if plan.seq == plan.requested_seq
        else f" (asked for {plan.requested_seq}: moved back to where no lease is held and no command is cut)"
    )
    done = "already complete, nothing appended" if appended == 0 else f"{appended} event(s) appended"
    print(f"forked task {source} at seq {plan.seq}{moved} as {task_id} in org {org}: {done}, last seq {last_seq}")
    print(f"the fork is {plan.state.status} on queue {plan.state.queue}")
    return 0


async def _diff(args: argparse.Namespace) -> int:
    org, first, second = (
        validate_token(args.org, "org"),
        validate_token(args.task_a, "task id"),
        validate_token(args.task_b, "task id"),
    )
    async with opened(args.nats_url) as store:
        a, _, _ = await current_task(store, org, first)
        b, _, _ = await current_task(store, org, second)
    diff = diff_tasks(a, b)
    if args.json:
        print(msgspec.json.format(_document.encode(diff)).decode())
    else:
        _print_diff(diff)
    return 0


def _print_diff(diff: TaskDiff, width: int = 48) -> None:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return value if isinstance(value, str) and len(value) <= width else short(value, width)

    def journal_cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "(none)"
        text = f"{entry['kind']} {entry['name']!r} -> {short(entry['result'])}"
        return text if len(text) <= width else text[: width - 1] + "…"

    rows = [(f.name, cell(f.a), cell(f.b), f.same) for f in diff.fields[:1]]
    rows += [(f"journal[{p.index}]", journal_cell(p.a), journal_cell(p.b), p.same) for p in diff.journal]
    rows += [(f.name, cell(f.a), cell(f.b), f.same) for f in diff.fields[1:]]
    print(f"{'':<12}   {'A ' + diff.a:<{width}}  {'B ' + diff.b}")
    for name, left, right, same in rows:
        mark = "   " if same else (">> " if name == diff.first_divergence else " ! ")
        print(f"{name:<12}{mark}{left:<{width}}  {right}")
    if diff.first_divergence is None:
        print("the tasks agree")
    else:
        print(f">> first divergence: {diff.first_divergence}")


def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since {value!r} is not an RFC 3339 time (e.g. 2026-11-22T09:00:00Z)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a stream sequence (an integer from 1)")
    return int(value)


def _entry(command: Callable[[argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    """Run an async command; a log that cannot be read is exit 3 with a message, as for connections."""

    def run(args: argparse.Namespace) -> int:
        try:
            return uvloop.run(command(args))
        except StoreError as exc:
            print(f"controlplane: {exc}", file=sys.stderr)
            return 3

    return run


# --- wiring ---------------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""

    def command(name: str, help_text: str, examples: Iterable[str], notes: str = "") -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}.",
            epilog="examples:\n"
            + "\n".join(f"  {example}" for example in examples)
            + (f"\n\n{notes}" if notes else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    history = command(
        "history",
        "print a task's timeline: seq, time, actor, event and what it meant (read-only)",
        ["controlplane history acme 0193a…", "controlplane history acme 0193a… --json | jq '.[].type'"],
    )
    history.add_argument("org")
    history.add_argument("task")
    history.add_argument("--json", action="store_true", help="the timeline as a JSON array, events in full")
    _connection(history)
    history.set_defaults(run=_entry(_history))

    state = command(
        "state",
        "print a task's state folded up to a stream sequence (read-only)",
        [
            "controlplane state acme 0193a… --at 1042",
            "controlplane state acme 0193a… --json   # now, as the API shows it",
        ],
    )
    state.add_argument("org")
    state.add_argument("task")
    state.add_argument("--at", type=_positive, help="stream sequence (default: the latest)")
    state.add_argument("--json", action="store_true", help="the task object of the API, with journal and approvals")
    _connection(state)
    state.set_defaults(run=_entry(_state))

    verify = command(
        "verify",
        "re-execute recorded workflow histories against the current code, without side effects (read-only)",
        [
            "controlplane verify acme --workflows myapp.workflows:ALL          # before a deploy",
            "controlplane verify acme --task 0193a… --workflows myapp.workflows:ALL",
            "controlplane verify acme --active --json    # only tasks a runner would still resume",
        ],
        (
            "Steps, LLM calls, clocks and ids are answered from the journal; nothing runs and nothing is"
            "\nwritten. Each recorded policy decision must have been made for the input the code asks with,"
            "\nand is decided again by the bundle that made it (the org's pushed versions, the shipped one):"
            "\nan engine that decides otherwise today diverges. Exit status 1 when any task diverges (each"
            "\ndivergence is printed with both sides)."
        ),
    )
    verify.add_argument("org")
    verify.add_argument("--task", help="verify this task only")
    verify.add_argument(
        "--workflows",
        action="append",
        help=f"module:attr of the code to check, repeatable (default {DEFAULT_WORKFLOWS})",
    )
    verify.add_argument("--active", action="store_true", help="only tasks that are not finished")
    verify.add_argument(
        "--time-limit", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds one task's replay may take"
    )
    verify.add_argument(
        "--skip-policies",
        action="store_true",
        help="do not decide recorded policy decisions again with the bundles that made them",
    )
    verify.add_argument("--verbose", "-v", action="store_true", help="also list tasks that are ok or skipped")
    verify.add_argument("--json", action="store_true", help="one report per task, as a JSON array")
    _connection(verify, progress=True)
    verify.set_defaults(run=_entry(_verify))

    export = command(
        "export",
        "write every event of an org as hash-chained JSON Lines (read-only)",
        [
            "controlplane export acme > audit.jsonl",
            "controlplane export acme --since 2026-11-01T00:00:00Z --output audit-november.jsonl",
        ],
        (
            "Each line carries seq, subject, time, actor, command/correlation/causation ids, the event as"
            "\nstored, prev and hash (sha256 over prev + the line's canonical JSON). Secret fields (an API"
            "\nkey's hash) read \"[redacted]\", as the header's `redacted` lists, and are hashed that way."
            "\nThe head (the last line's hash) is printed on stderr: keep it, and check the file with"
            "\n`controlplane audit verify`. --since compares the time the log stored each event."
        ),
    )
    export.add_argument("org")
    export.add_argument("--since", help="RFC 3339 time: only events stored at or after it")
    export.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    _connection(export, progress=True)
    export.set_defaults(run=_entry(_export))

    audit = commands.add_parser("audit", help="check audit exports").add_subparsers(dest="audit_command", required=True)
    audit_verify = audit.add_parser(
        "verify",
        help="check an export's hash chain: any edited, dropped or reordered line fails",
        description="Check an export's hash chain. Exit status 1 names the first bad line and why.",
        epilog="examples:\n  controlplane audit verify audit.jsonl\n"
        "  controlplane audit verify audit.jsonl --head sha256:…   # the head printed by export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit_verify.add_argument("file", type=Path, help="the export, or - for stdin")
    audit_verify.add_argument("--head", help="the head kept from the export: proves the file was not rewritten whole")
    audit_verify.add_argument("--json", action="store_true")
    audit_verify.set_defaults(run=_audit_verify)

    fork = command(
        "fork",
        "copy a task's history up to a sequence into a new task, for a what-if run (writes)",
        [
            "controlplane fork acme 0193a… --at 1042 --as whatif-1 --queue whatif",
            "controlplane runner --queue whatif --workflows myapp.workflows_next:ALL   # then run it elsewhere",
        ],
        (
            "Copies the source's events up to the latest point at or before --at where no lease is held"
            "\nand no command is cut in half, with the fork's task and approval ids, and records"
            "\nmetadata.forked_from = {task, seq} in its submit. The new task must not exist. Use --queue so"
            "\nthat production runners do not claim the fork."
        ),
    )
    fork.add_argument("org")
    fork.add_argument("task")
    fork.add_argument("--at", type=_positive, required=True, help="stream sequence to fork at")
    fork.add_argument("--as", dest="new_id", help="id of the new task (default: a fresh id)")
    fork.add_argument("--queue", help="queue of the fork (default: the source's)")
    fork.add_argument("--json", action="store_true")
    _connection(fork)
    fork.set_defaults(run=_entry(_fork))

    diff = command(
        "diff",
        "compare two tasks side by side: payload, journal operation by operation, outcome (read-only)",
        ["controlplane diff acme 0193a… whatif-1", "controlplane diff acme 0193a… whatif-1 --json"],
    )
    diff.add_argument("org")
    diff.add_argument("task_a")
    diff.add_argument("task_b")
    diff.add_argument("--json", action="store_true")
    _connection(diff)
    diff.set_defaults(run=_entry(_diff))


def _connection(parser: argparse.ArgumentParser, *, progress: bool = False) -> None:
    nats_url_argument(parser)
    if progress:
        parser.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress bar on stderr (default: when stderr is a terminal)",
        )
