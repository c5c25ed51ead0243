"""CLI commands for an org's secrets and its worker configuration, through the gateway's API with an
admin's key (the org is the key's): ``secrets set NAME --value-file F`` (or ``-`` for stdin; never
the command line, which every local user can read) and ``secrets list`` (names and versions, never
values); ``worker-config set`` and ``worker-config get``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec

from controlplane.connection import gateway_request, gateway_url_argument, key_arguments

_SET_EXAMPLES = """\
examples:
  CP_API_KEY=$ADMIN_KEY controlplane secrets set OPENAI_API_KEY --value-file ~/openai.key
  printf %s "$TOKEN" | controlplane secrets set DEPLOY_TOKEN --value-file - --environment prod

Setting a name again is a rotation: a new version. A task reads the version it read first until it
ends; later tasks read the newest. A secret set for an environment is read by that environment's
tasks instead of the org-wide one of the same name. Workflows read it with ctx.secret(NAME).
"""

_CONFIG_EXAMPLES = """\
examples:
  controlplane worker-config set --lease-seconds 60 --api-base http://litellm:4000 --fallback gpt-4o-mini
  controlplane worker-config set --environment prod --model-override gpt-4o

Each set replaces that scope's configuration whole. A worker gets its queue's environment's settings,
field by field over the org's, when it registers.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``secrets`` and ``worker-config``; each subcommand sets ``run=fn(args) -> exit code``."""
    secrets = commands.add_parser("secrets", help="manage an org's secrets").add_subparsers(
        dest="secrets_command", required=True
    )
    put = secrets.add_parser(
        "set",
        help="set a new version of a secret (admin)",
        epilog=_SET_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    put.add_argument("name")
    put.add_argument("--value-file", metavar="PATH", help="the value (required): a file's content, or - for stdin")
    put.add_argument("--environment", help="readable only by tasks of this environment")
    put.add_argument("--value", help=argparse.SUPPRESS)  # refused, saying why (else it would abbreviate --value-file)
    _gateway_args(put)
    put.set_defaults(run=_set_secret)
    listing = secrets.add_parser("list", help="list secrets: names, scopes and versions, never values (admin)")
    listing.add_argument("--json", action="store_true")
    _gateway_args(listing)
    listing.set_defaults(run=_list_secrets)
    rewrap = secrets.add_parser(
        "rewrap",
        help="after a master key rotation, wrap every version with the gateway's current key (admin)",
        description="Every secret version and notification channel credential still sealed by a previous master "
        "key (CP_SECRETS_PREVIOUS_KEYS) is wrapped by the current one (CP_SECRETS_KEY); then the previous key "
        "can be retired. Safe to run again. Exits 1 if something could not be opened (sealed by a key the "
        "gateway does not hold).",
    )
    _gateway_args(rewrap)
    rewrap.set_defaults(run=_rewrap_secrets)

    config = commands.add_parser("worker-config", help="manage what workers are told at registration").add_subparsers(
        dest="worker_config_command", required=True
    )
    set_config = config.add_parser(
        "set",
        help="replace the org's (or an environment's) worker configuration (admin)",
        epilog=_CONFIG_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    set_config.add_argument("--environment", help="this environment's configuration instead of the org's")
    set_config.add_argument("--heartbeat-interval-seconds", type=float)
    set_config.add_argument("--lease-seconds", type=float)
    set_config.add_argument("--api-base", help="the LLM gateway (LiteLLM proxy) URL")
    set_config.add_argument("--model-override", help="the model every LLM call uses")
    set_config.add_argument("--fallback", action="append", help="a fallback model, in order; repeatable")
    _gateway_args(set_config)
    set_config.set_defaults(run=_set_config)
    get_config = config.add_parser("get", help="show the org's (or an environment's) worker configuration (admin)")
    get_config.add_argument("--environment")
    _gateway_args(get_config)
    get_config.set_defaults(run=_get_config)


def _gateway_args(parser: argparse.ArgumentParser) -> None:
    gateway_url_argument(parser)
    key_arguments(parser, "CP_API_KEY", "API key (an admin's)")


def read_value(path: str) -> str:
    """The value from a file, or stdin for ``-``; one trailing newline (what editors and echo add) is dropped."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    value = text.removesuffix("\n")
    if not value:
        raise ValueError(f"--value-file {path}: the value is empty")
    return value


def _set_secret(args: argparse.Namespace) -> int:
    if args.value is not None:
        raise ValueError(
            "--value is refused: on the command line every local user can read it (ps, /proc) and your shell "
            "history keeps it; give --value-file PATH, or --value-file - to read stdin"
        )
    if args.value_file is None:
        raise ValueError("give the value with --value-file PATH, or --value-file - to read stdin")
    body: dict[str, Any] = {"value": read_value(args.value_file)}
    if args.environment:
        body["environment"] = args.environment
    answer = gateway_request(args, "PUT", f"/v1/secrets/{args.name}", body)
    scope = "org-wide" if answer["environment"] is None else f"environment {answer['environment']}"
    print(f"secret {answer['name']} ({scope}): version {answer['version']} (seq {answer['seq']})")
    return 0


def _list_secrets(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "GET", "/v1/secrets")
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(answer)).decode())
        return 0
    if not answer["items"]:
        print("no secrets")
    for item in answer["items"]:
        scope = item["environment"] or "(org-wide)"
        versions = ", ".join(map(str, item["versions"]))
        print(f"{item['name']:<32} {scope:<20} version {item['version']} (versions {versions})")
    return 0


def _rewrap_secrets(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "POST", "/v1/secrets/rewrap", {})
    print(f"re-wrapped {len(answer['rewrapped'])} version(s) with master key {answer['key_id']}")
    for item in answer["rewrapped"]:
        print(f"  {item['name']} version {item['version']} (was {item['from_key_id']})")
    for item in answer["channels"]["rewrapped"]:
        print(f"  notification channel {item['name']} ({', '.join(item['fields'])})")
    for item in answer["unreadable"]:
        print(f"  not re-wrapped: {item['name']} version {item['version']}: {item['reason']}", file=sys.stderr)
    for item in answer["channels"]["unreadable"]:
        print(f"  not re-wrapped: notification channel {item['name']}: {item['reason']}", file=sys.stderr)
    return 1 if answer["unreadable"] or answer["channels"]["unreadable"] else 0


def _config_path(args: argparse.Namespace) -> str:
    return "/v1/worker-config" + (f"?environment={args.environment}" if args.environment else "")


def _set_config(args: argparse.Namespace) -> int:
    body = {
        "heartbeat_interval_seconds": args.heartbeat_interval_seconds,
        "lease_seconds": args.lease_seconds,
        "llm": {"api_base": args.api_base, "model_override": args.model_override, "fallbacks": args.fallback},
    }
    answer = gateway_request(args, "PUT", _config_path(args), body)
    print(msgspec.json.format(msgspec.json.encode(answer)).decode())
    return 0


def _get_config(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "GET", _config_path(args))
    print(msgspec.json.format(msgspec.json.encode(answer)).decode())
    return 0
