"""Where CLI commands connect when not told: the environment first, then this directory's dev stack,
then the usual local ports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from controlplane.connection import database_url_argument, gateway_url_argument, nats_url_argument


def defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    nats_url_argument(parser)
    database_url_argument(parser)
    gateway_url_argument(parser)
    return parser.parse_args([])


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for variable in ("CP_NATS_URL", "DATABASE_URL", "CP_GATEWAY_URL"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def test_without_a_dev_stack_the_local_ports(here: Path) -> None:
    found = defaults()
    assert (found.nats_url, found.database_url, found.url) == (
        "nats://127.0.0.1:4222",
        None,
        "http://127.0.0.1:8080",
    )


def test_the_dev_stack_of_this_directory_then_the_environment_over_it(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (here / ".controlplane").mkdir()
    stack = {"nats_url": "nats://127.0.0.1:41000", "database_url": "postgresql://dev", "gateway_url": "http://gw"}
    (here / ".controlplane" / "dev.json").write_text(json.dumps(stack))
    found = defaults()
    assert (found.nats_url, found.database_url, found.url) == tuple(stack.values())
    monkeypatch.setenv("CP_NATS_URL", "nats://elsewhere:4222")
    assert defaults().nats_url == "nats://elsewhere:4222"


def test_an_unreadable_dev_json_is_ignored(here: Path) -> None:
    (here / ".controlplane").mkdir()
    (here / ".controlplane" / "dev.json").write_text("{not json")
    assert defaults().nats_url == "nats://127.0.0.1:4222"
