"""CLI commands for nats-config and the webhook forwarder: integrations on the log."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
