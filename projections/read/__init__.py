"""The gateway's read side: queries over the projections' tables, one module per concern (tasks and
approvals, workers, usage, summaries, what admins set up, API keys, checkpoints), all reading through
the org scope of ``scope``. :class:`ReadModel` is all of them on one pool."""

from __future__ import annotations

import asyncpg

from projections.read.checkpoints import CheckpointReads
from projections.read.keys import KeyReads
from projections.read.settings import SettingsReads
from projections.read.summary import SummaryReads
from projections.read.tasks import TaskReads
from projections.read.usage import UsageReads
from projections.read.workers import WorkerReads

DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
)
"""What asyncpg raises while PostgreSQL is down or restarting, as opposed to a query it refused."""


class ReadModel(CheckpointReads, TaskReads, WorkerReads, SummaryReads, UsageReads, SettingsReads, KeyReads):
    """Queries for the gateway. One instance per process; ``close`` releases its LISTEN connection."""
