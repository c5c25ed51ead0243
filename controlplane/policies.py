"""CLI commands for policy bundles: push a new version of an org's bundle, list the versions. They go
through the gateway's API with an admin key (the org is the key's), like any other client."""

from __future__ import annotations

import argparse
import base64

import msgspec

from controlplane.connection import gateway_request, gateway_url_argument, key_arguments
from policies_wasm import Bundle, PolicyLoadError

_PUSH_EXAMPLES = """\
examples:
  CP_API_KEY=$ADMIN_KEY controlplane policies push policies_wasm/policies
  controlplane policies push build/bundle.tar.gz --url http://gw:8080 --key-file admin.key   # from opa build -t wasm

DIR is a directory of .rego files and data.json documents (data.json in a/b holds data.a.b), or an
`opa build` tarball, whose policy.wasm is then used by the OPA-wasm engine. The bundle must declare the
entrypoint controlplane/submit. The gateway compiles it before recording it: a bundle that does not
compile is refused and changes nothing. The new version decides every later submission; tasks already
submitted keep the version they started with. Pushing the current content again records nothing.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
    policies = commands.add_parser("policies", help="manage an org's policy bundles").add_subparsers(
        dest="policies_command", required=True
    )
    push = policies.add_parser(
        "push",
        help="record a new version of the org's policy bundle (admin)",
        description="Record a new version of the org's policy bundle.",
        epilog=_PUSH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("bundle", metavar="DIR", help="a directory of Rego sources and data.json, or a bundle.tar.gz")
    push.add_argument("--revision", help="a label to record with it (default: the bundle manifest's revision)")
    _gateway_args(push)
    push.set_defaults(run=_push)

    listing = policies.add_parser(
        "list",
        help="list the org's policy bundle versions, newest first",
        description="List the org's policy bundle versions, newest first (the current one is marked).",
    )
    listing.add_argument("--json", action="store_true")
    _gateway_args(listing)
    listing.set_defaults(run=_list)


def _gateway_args(parser: argparse.ArgumentParser) -> None:
    gateway_url_argument(parser)
    key_arguments(parser, "CP_API_KEY", "API key (an admin's, to push)")


def _push(args: argparse.Namespace) -> int:
    try:
        bundle = Bundle.load(args.bundle)
    except PolicyLoadError as exc:
        raise ValueError(str(exc)) from None
    if not bundle.modules:
        raise ValueError(f"{args.bundle} holds no .rego modules")
    body = {
        "modules": dict(bundle.modules),
        "data": bundle.data,
        "wasm": None if bundle.wasm is None else base64.b64encode(bundle.wasm).decode(),
        "revision": args.revision if args.revision is not None else bundle.revision,
    }
    answer = gateway_request(args, "POST", "/v1/policy-bundles", body)
    if answer["unchanged"]:
        print(f"unchanged: this bundle is already version {answer['version']} ({answer['digest']})")
    else:
        print(
            f"pushed version {answer['version']} ({answer['digest']}, engine {answer['engine']}, "
            f"entrypoints {', '.join(answer['entrypoints'])}) at seq {answer['seq']}"
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    answer = gateway_request(args, "GET", "/v1/policy-bundles")
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(answer)).decode())
        return 0
    if not answer["items"]:
        print("no bundle pushed: the shipped policies decide")
        return 0
    for item in answer["items"]:
        mark = "*" if item["version"] == answer["current"] else " "
        revision = f"  revision {item['revision']}" if item["revision"] else ""
        print(
            f"{mark} v{item['version']:<4} {item['pushed_at']}  {item['digest'][:19]}…  "
            f"by {item['pushed_by']}{revision}{'  (wasm)' if item['compiled'] else ''}"
        )
    return 0
