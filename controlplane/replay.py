"""CLI commands for history, state, verify, export, audit, fork, diff: replay and audit of the log."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands; each sets ``run=fn(args) -> exit code`` as its default."""
