"""Where the CLI's commands connect when not told: the environment (``CP_NATS_URL``, ``DATABASE_URL``,
``CP_GATEWAY_URL``), else the dev stack of this directory (``.controlplane/dev.json``, written by
``controlplane dev``), else the usual local ports. So after ``make run``, ``controlplane history acme
TASK`` reads the stack that is running, not whatever else listens on port 4222."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

DEV_JSON = Path(".controlplane") / "dev.json"


def _dev_stack() -> dict[str, Any]:
    try:
        described = json.loads(DEV_JSON.read_text())
    except (OSError, ValueError):
        return {}
    return described if isinstance(described, dict) else {}


def _default(variable: str, dev_key: str, fallback: str | None) -> str | None:
    return os.environ.get(variable) or _dev_stack().get(dev_key) or fallback


def without_credentials(urls: str) -> str:
    """``urls`` (one URL or a comma-separated list) for people and logs: user and password removed."""
    return ",".join(
        urlsplit(url)._replace(netloc=urlsplit(url).netloc.rpartition("@")[2]).geturl() for url in urls.split(",")
    )


def nats_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        default=_default("CP_NATS_URL", "nats_url", "nats://127.0.0.1:4222"),
        help=f"default: $CP_NATS_URL, else the dev stack's ({DEV_JSON}), else nats://127.0.0.1:4222; a URL with a "
        "password belongs in $CP_NATS_URL, not on the command line",
    )


def database_url_argument(parser: argparse.ArgumentParser, login: str | None = None) -> None:
    """``login`` names the dev stack's least-privilege role the command runs as (``gateway`` or
    ``projector``, from dev.json's ``database_logins``); without it, the owner's URL."""
    dev_url = _dev_stack().get("database_logins", {}).get(login) if login else None
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or dev_url or _dev_stack().get("database_url"),
        help=f"default: $DATABASE_URL, else the dev stack's ({DEV_JSON}); a URL with a password belongs in "
        "$DATABASE_URL, not on the command line",
    )


def gateway_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=_default("CP_GATEWAY_URL", "gateway_url", "http://127.0.0.1:8080"),
        help=f"the gateway; default: $CP_GATEWAY_URL, else the dev stack's ({DEV_JSON}), else http://127.0.0.1:8080",
    )


def key_arguments(parser: argparse.ArgumentParser, variable: str, what: str) -> None:
    """``--key-file PATH``; without it the key comes from ``$variable``. Never the command line."""
    parser.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help=f"read the {what} from PATH, which only its owner may read (chmod 600); default: ${variable}",
    )
    parser.add_argument("--key", help=argparse.SUPPRESS)  # refused with a message saying why and what instead


def key_from(args: argparse.Namespace, environ: Mapping[str, str], variable: str, *fallbacks: str) -> str:
    """The key of ``key_arguments``: --key-file, else the first of ``variable`` and ``fallbacks`` set."""
    if args.key:
        raise ValueError(
            "--key is refused: on the command line every local user can read the key (ps, /proc); "
            f"set ${variable} or give --key-file PATH"
        )
    if args.key_file is not None:
        return read_key_file(args.key_file)
    for name in (variable, *fallbacks):
        if key := environ.get(name):
            return key
    raise ValueError(f"a key is needed: set ${variable} or give --key-file PATH")


def read_key_file(path: Path) -> str:
    """A key from a file only its owner can read or write; refused otherwise."""
    try:
        with path.open() as opened:
            mode = stat.S_IMODE(os.fstat(opened.fileno()).st_mode)
            if mode & 0o077:
                raise ValueError(
                    f"{path} can be read or written by others (mode {mode:04o}); it holds a key: chmod 600 {path}"
                )
            key = opened.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the key file {path}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"the key file {path} is empty")
    return key


def gateway_request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """One call of the gateway's API for a CLI command (``--url`` and the key of ``key_arguments``, role
    taken from ``$CP_API_KEY``): the JSON answer, or exit 1 printing the problem's detail (3 when the
    gateway cannot be reached)."""
    key = key_from(args, os.environ, "CP_API_KEY")
    try:
        response = httpx.request(
            method, f"{args.url.rstrip('/')}{path}", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    except httpx.HTTPError as exc:
        print(f"controlplane: cannot reach the gateway at {args.url} ({exc!r}); check --url", file=sys.stderr)
        raise SystemExit(3) from None
    if response.is_error:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        print(f"controlplane: {response.status_code} {detail}", file=sys.stderr)
        raise SystemExit(1)
    return {} if response.status_code == 204 else response.json()  # type: ignore[no-any-return]
