"""CLI commands for queue settings: show a queue's, list the queues that have their own, set or remove
them. They go through the gateway's API with a key (an admin's to change anything; the org is the key's)."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from controlplane.connection import gateway_request, gateway_url_argument, key_arguments
from core.domain.commands import DEFAULT_BREAKER_COOLDOWN_SECONDS, DEFAULT_BREAKER_FAILURES

_SET_EXAMPLES = """\
examples:
  CP_API_KEY=$ADMIN_KEY controlplane queues set gpu-jobs --strategy least_loaded
  controlplane queues set flaky-api --breaker-failures 5 --breaker-cooldown 300

The strategy picks which of the workers waiting on the queue gets a task that opens up: fifo (the one
waiting longest, the default), least_loaded (the one holding the fewest leases), round_robin (the next
worker id), random. The breaker opens a worker's circuit after that many consecutive failed attempts
(non-retryable failures, lease expiries), for that many seconds. Settings are set whole: what is left
out takes its default (fifo; 3 failures; 60 s).
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
    queues = commands.add_parser("queues", help="manage queue settings").add_subparsers(
        dest="queues_command", required=True
    )
    listing = queues.add_parser("list", help="list the queues that have settings of their own")
    listing.add_argument("--json", action="store_true")
    _gateway_args(listing)
    listing.set_defaults(run=_list)

    show = queues.add_parser("get", help="show a queue's settings (the defaults when it has none)")
    show.add_argument("name")
    _gateway_args(show)
    show.set_defaults(run=_get)

    settings = queues.add_parser(
        "set",
        help="set a queue's claim strategy and breaker (admin)",
        epilog=_SET_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings.add_argument("name")
    settings.add_argument("--strategy", choices=("fifo", "least_loaded", "round_robin", "random"), default="fifo")
    settings.add_argument("--breaker-failures", type=int, default=DEFAULT_BREAKER_FAILURES, metavar="N")
    settings.add_argument("--breaker-cooldown", type=float, default=DEFAULT_BREAKER_COOLDOWN_SECONDS, metavar="SECONDS")
    _gateway_args(settings)
    settings.set_defaults(run=_set)

    remove = queues.add_parser("remove", help="bring a queue back to the defaults (admin)")
    remove.add_argument("name")
    _gateway_args(remove)
    remove.set_defaults(run=_remove)


def _gateway_args(parser: argparse.ArgumentParser) -> None:
    gateway_url_argument(parser)
    key_arguments(parser, "CP_API_KEY", "API key (an admin's, to change settings)")


def _describe(item: dict[str, Any]) -> str:
    breaker = item["breaker"]
    origin = "" if item["configured"] else "  (defaults)"
    return (
        f"{item['name']:<24} {item['strategy']:<13} breaker after {breaker['failures']} failures "
        f"for {breaker['cooldown_seconds']:g} s{origin}"
    )


def _set(args: argparse.Namespace) -> int:
    body = {
        "strategy": args.strategy,
        "breaker": {"failures": args.breaker_failures, "cooldown_seconds": args.breaker_cooldown},
    }
    answer = gateway_request(args, "PUT", f"/v1/queues/{args.name}", body)
    print(f"{_describe(answer)}  (seq {answer['seq']})")
    return 0


def _get(args: argparse.Namespace) -> int:
    print(_describe(gateway_request(args, "GET", f"/v1/queues/{args.name}")))
    return 0


def _list(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "GET", "/v1/queues")
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(answer)).decode())
        return 0
    if not answer["items"]:
        print("no queue has settings of its own: every queue is fifo, breaker after 3 failures for 60 s")
    for item in answer["items"]:
        print(_describe(item))
    return 0


def _remove(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "DELETE", f"/v1/queues/{args.name}")
    print(f"{_describe(answer)}  (seq {answer['seq']})")
    return 0
