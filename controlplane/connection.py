"""Where the CLI's commands connect when not told: the environment (``CP_NATS_URL``, ``DATABASE_URL``,
``CP_GATEWAY_URL``), else the dev stack of this directory (``.controlplane/dev.json``, written by
``controlplane dev``), else the usual local ports. So after ``make run``, ``controlplane history acme
TASK`` reads the stack that is running, not whatever else listens on port 4222."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DEV_JSON = Path(".controlplane") / "dev.json"


def _dev_stack() -> dict[str, Any]:
    try:
        described = json.loads(DEV_JSON.read_text())
    except (OSError, ValueError):
        return {}
    return described if isinstance(described, dict) else {}


def _default(variable: str, dev_key: str, fallback: str | None) -> str | None:
    return os.environ.get(variable) or _dev_stack().get(dev_key) or fallback


def nats_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        default=_default("CP_NATS_URL", "nats_url", "nats://127.0.0.1:4222"),
        help=f"default: $CP_NATS_URL, else the dev stack's ({DEV_JSON}), else nats://127.0.0.1:4222",
    )


def database_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=_default("DATABASE_URL", "database_url", None),
        help=f"default: $DATABASE_URL, else the dev stack's ({DEV_JSON})",
    )


def gateway_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=_default("CP_GATEWAY_URL", "gateway_url", "http://127.0.0.1:8080"),
        help=f"the gateway; default: $CP_GATEWAY_URL, else the dev stack's ({DEV_JSON}), else http://127.0.0.1:8080",
    )
