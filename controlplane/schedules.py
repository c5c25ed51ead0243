"""CLI commands for an org's schedules (cron): list, create, pause, resume, trigger, delete. They go
through the gateway's API with a key (an admin's or a submitter's; the org is the key's)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import msgspec

from controlplane.connection import gateway_request, gateway_url_argument, key_arguments

_CREATE_EXAMPLES = """\
examples:
  CP_API_KEY=$SUBMITTER_KEY controlplane schedules create nightly-report --cron "30 2 * * *" \\
      --timezone Europe/Paris --type report --queue reports --payload '{"scope": "all"}'
  controlplane schedules create heartbeat --cron "*/10 * * * * *" --type ping --overlap allow   # seconds first

A fire submits the task as POST /v1/tasks would (environments and the submit policy apply), with
metadata.schedule_id; a fire while the previous run is open is skipped (--overlap skip, the default),
runs anyway (allow) or cancels the previous run first (cancel_previous). After downtime a schedule
runs once to catch up, then keeps to its cron.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
    schedules = commands.add_parser("schedules", help="manage an org's cron schedules").add_subparsers(
        dest="schedules_command", required=True
    )
    listing = schedules.add_parser("list", help="list the org's schedules, their next fire and last run")
    listing.add_argument("--json", action="store_true")
    _gateway_args(listing)
    listing.set_defaults(run=_list)

    create = schedules.add_parser(
        "create",
        help="create a schedule that submits a task at each cron time",
        epilog=_CREATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("id", nargs="?", help="the schedule's id (default: one is chosen)")
    create.add_argument("--cron", required=True, help="5 fields, or 6 with seconds first")
    create.add_argument("--timezone", default="UTC", help="IANA time zone of the cron times (default UTC)")
    create.add_argument("--type", required=True, help="the submitted task's type")
    create.add_argument("--queue", help="the task's queue")
    create.add_argument("--environment", help="the task's environment (its first queue, unless --queue)")
    create.add_argument("--payload", default="null", help="the task's payload, as JSON")
    create.add_argument("--workflow", help="the workflow the task runs")
    create.add_argument("--overlap", choices=("skip", "allow", "cancel_previous"), default="skip")
    create.add_argument("--paused", action="store_true", help="create it paused")
    _gateway_args(create)
    create.set_defaults(run=_create)

    for name, text in (
        ("pause", "stop a schedule's fires until resumed"),
        ("resume", "fire again from the next cron time"),
        ("trigger", "run a schedule now (its overlap policy applies)"),
        ("delete", "delete a schedule"),
    ):
        action = schedules.add_parser(name, help=text)
        action.add_argument("id")
        _gateway_args(action)
        action.set_defaults(run=_delete if name == "delete" else _action(name))


def _gateway_args(parser: argparse.ArgumentParser) -> None:
    gateway_url_argument(parser)
    key_arguments(parser, "CP_API_KEY", "API key (an admin's or a submitter's)")


def _line(item: dict[str, Any]) -> str:
    state = "paused" if item["paused"] else f"next {item['next_fire_at']}"
    last = f"last {item['last_outcome']} {item['last_task_id'] or ''}".rstrip() if item["last_outcome"] else "never ran"
    return f"{item['id']:<24} {item['cron']:<20} {item['timezone']:<16} {item['overlap']:<16} {state}  {last}"


def _create(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise ValueError(f"--payload is not JSON: {exc}") from None
    task: dict[str, Any] = {"type": args.type, "payload": payload}
    for field in ("queue", "environment"):
        if getattr(args, field):
            task[field] = getattr(args, field)
    if args.workflow:
        task["workflow"] = {"name": args.workflow}
    body: dict[str, Any] = {
        "cron": args.cron,
        "timezone": args.timezone,
        "task": task,
        "overlap": args.overlap,
        "paused": args.paused,
    }
    if args.id:
        body["id"] = args.id
    print(_line(gateway_request(args, "POST", "/v1/schedules", body)))
    return 0


def _list(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "GET", "/v1/schedules")
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(answer)).decode())
        return 0
    if not answer["items"]:
        print("no schedules")
    for item in answer["items"]:
        print(_line(item))
    return 0


def _action(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        print(_line(gateway_request(args, "POST", f"/v1/schedules/{args.id}/{name}")))
        return 0

    return run


def _delete(args: argparse.Namespace) -> int:
    gateway_request(args, "DELETE", f"/v1/schedules/{args.id}")
    print(f"schedule {args.id} deleted")
    return 0
