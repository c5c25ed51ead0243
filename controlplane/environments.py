"""CLI commands for an org's environments: list them, create or replace one with its queues, delete one.
They go through the gateway's API with a key (an admin's to change anything; the org is the key's)."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from controlplane.connection import gateway_request, gateway_url_argument, key_arguments

_CREATE_EXAMPLES = """\
examples:
  CP_API_KEY=$ADMIN_KEY controlplane environments create prod --queue deploys --queue hotfixes --label tier=critical
  controlplane environments create prod --queue deploys --replace    # replace prod's queues and labels whole

A queue belongs to at most one environment of the org. A task's environment is its queue's: the submit
policy sees that one (by default tasks in prod need approval), never what a submitter declares. A
submit may name the environment instead of a queue: it goes to the environment's first queue.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
    environments = commands.add_parser("environments", help="manage an org's environments").add_subparsers(
        dest="environments_command", required=True
    )
    listing = environments.add_parser("list", help="list the org's environments and their queues")
    listing.add_argument("--json", action="store_true")
    _gateway_args(listing)
    listing.set_defaults(run=_list)

    create = environments.add_parser(
        "create",
        help="create an environment holding queues (admin)",
        description="Create an environment holding queues, or with --replace create or replace it whole.",
        epilog=_CREATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("name")
    create.add_argument("--queue", action="append", default=[], help="a queue it holds, in order; repeatable")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    create.add_argument("--replace", action="store_true", help="replace an existing environment's queues and labels")
    _gateway_args(create)
    create.set_defaults(run=_create)

    delete = environments.add_parser("delete", help="delete an environment (admin); its queues then belong to none")
    delete.add_argument("name")
    _gateway_args(delete)
    delete.set_defaults(run=_delete)


def _gateway_args(parser: argparse.ArgumentParser) -> None:
    gateway_url_argument(parser)
    key_arguments(parser, "CP_API_KEY", "API key (an admin's, to change environments)")


def labels_of(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--label {pair!r}: write KEY=VALUE")
        labels[key] = value
    return labels


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"queues": args.queue, "labels": labels_of(args.label)}
    if args.replace:
        answer = gateway_request(args, "PUT", f"/v1/environments/{args.name}", body)
    else:
        answer = gateway_request(args, "POST", "/v1/environments", {"name": args.name, **body})
    print(f"environment {answer['name']}: queues {', '.join(answer['queues']) or 'none'} (seq {answer['seq']})")
    return 0


def _list(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "GET", "/v1/environments")
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(answer)).decode())
        return 0
    if not answer["items"]:
        print("no environments: every task's environment is none")
    for item in answer["items"]:
        labels = "".join(f"  {key}={value}" for key, value in sorted(item["labels"].items()))
        print(f"{item['name']:<20} {', '.join(item['queues']) or '(no queues)'}{labels}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    gateway_request(args, "DELETE", f"/v1/environments/{args.name}")
    print(f"environment {args.name} deleted")
    return 0
