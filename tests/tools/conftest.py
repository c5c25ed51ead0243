"""Real servers for the replay and audit tools: the session's nats-server and PostgreSQL (fixtures
re-exported from the integration suite), a whole stack of their own for workflow runs, and ``cli``:
the ``controlplane`` command run in a thread, as a user runs it, against the session's nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from controlplane.cli import main
from controlplane.embedded import EmbeddedNats
from core.domain.ids import new_id
from tests.gateway.conftest import Stack, serve_stack
from tests.integration.conftest import handler, org, store  # noqa: F401


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


Cli = Callable[..., Awaitable[Ran]]


@pytest.fixture
def cli(nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("CP_NATS_URL", nats_server.url)

    def invoke(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as exited:  # argparse: --help, or arguments it refuses
            return exited.code if isinstance(exited.code, int) else 2

    async def run(*argv: str) -> Ran:
        capsys.readouterr()
        code = await asyncio.to_thread(invoke, list(argv))
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


@dataclass(frozen=True)
class ToolsStack:
    stack: Stack
    nats_url: str


@pytest.fixture(scope="module")
async def tools_stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[ToolsStack]:
    """Gateway, projector, PostgreSQL database and nats-server of its own. On the session's
    nats-server its projector would share durable consumers with the gateway suite's stack (both
    use the default consumer names) and each would get only part of the events."""
    database = f"tools_{new_id()[-12:]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    scheme, rest = database_url.split("://", 1)
    authority, _, tail = rest.partition("/")
    _, query_sep, query = tail.partition("?")
    try:
        with EmbeddedNats(tmp_path_factory.mktemp("tools-nats")) as nats:
            async with serve_stack(nats.url, f"{scheme}://{authority}/{database}{query_sep}{query}") as served:
                yield ToolsStack(served, nats.url)
    finally:
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
