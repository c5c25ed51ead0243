"""Finding 10: NATS was open in the dev stack. Every server the project starts requires a login; the
control plane's user owns the log; an org's integration user (the dev stack makes one per org) reads
only its own org's events through its own consumers and cannot write to the log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
import yaml

from controlplane.dev_nats import DevNats, dev_nats
from controlplane.embedded import EmbeddedNats, free_port, nats_server_binary
from core.domain.subjects import EVENTS_PREFIX
from integrations.permissions import cp_exports

pytestmark = pytest.mark.integration


async def _refused(url: str, **login: str) -> str:
    """The server's answer to a connection attempt that must fail."""
    errors: list[str] = []

    async def collect(error: Exception) -> None:
        errors.append(str(error))

    with pytest.raises((nats.errors.Error, OSError)) as refused:
        await nats.connect(url, allow_reconnect=False, connect_timeout=2, error_cb=collect, **login)
    return str(refused.value) + " ".join(errors)


@pytest.fixture(scope="module")
def dev_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevNats]:
    with dev_nats(tmp_path_factory.mktemp("dev"), 1, ("acme", "globex")) as servers:
        yield servers


async def test_an_anonymous_client_is_refused(dev_servers: DevNats) -> None:
    assert "Authorization Violation" in await _refused(dev_servers.address)


async def test_a_wrong_password_is_refused(dev_servers: DevNats) -> None:
    assert "Authorization Violation" in await _refused(dev_servers.address, user="controlplane", password="guess")


async def test_the_control_plane_login_is_in_the_url_and_owns_the_log(dev_servers: DevNats) -> None:
    nc = await nats.connect(dev_servers.url)
    try:
        info = await nc.jetstream().stream_info("CP_EVENTS")
        assert info.config.name == "CP_EVENTS"
    finally:
        await nc.close()


async def test_an_integration_user_cannot_append_to_the_log(dev_servers: DevNats) -> None:
    """The attack of the review: a forged ``ApiKeyCreated`` published straight into an org's subject."""
    login = dev_servers.integrations["acme"]
    violations: list[str] = []

    async def collect(error: Exception) -> None:
        violations.append(str(error))

    nc = await nats.connect(dev_servers.address, user=login.user, password=login.password, error_cb=collect)
    try:
        forged = json.dumps({"type": "ApiKeyCreated", "v": 1}).encode()
        await nc.publish(f"{EVENTS_PREFIX}.acme.apikey.forged", forged)
        await nc.flush()
        await asyncio.sleep(0.2)  # the violation arrives asynchronously
    finally:
        await nc.close()
    assert any("permissions violation" in violation.lower() for violation in violations), violations
    checker = await nats.connect(dev_servers.url)
    try:
        info = await checker.jetstream().stream_info("CP_EVENTS", subjects_filter=f"{EVENTS_PREFIX}.acme.apikey.forged")
        assert not info.state.subjects
    finally:
        await checker.close()


async def test_each_org_has_its_own_integration_login(dev_servers: DevNats) -> None:
    acme, globex = dev_servers.integrations["acme"], dev_servers.integrations["globex"]
    assert acme.password != globex.password
    assert all(name.endswith("@acme") for name in acme.consumers)
    assert "Authorization Violation" in await _refused(dev_servers.address, user=acme.user, password=globex.password)


def test_logins_are_kept_owner_only_and_survive_a_restart(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "nats") as server:
        first = server.url
    assert (tmp_path / "nats" / "login.json").stat().st_mode & 0o077 == 0
    assert (tmp_path / "nats" / "nats-server.conf").stat().st_mode & 0o077 == 0
    with EmbeddedNats(tmp_path / "nats") as server:
        assert server.url.rsplit("@", 1)[0] == first.rsplit("@", 1)[0]


async def test_a_log_written_before_logins_is_kept(tmp_path: Path) -> None:
    """A data directory from an open server (the global account) is taken over by the log account."""
    data_dir = tmp_path / "nats"
    port = free_port()
    open_server = await asyncio.create_subprocess_exec(
        *(str(nats_server_binary()), "-js", "-sd", str(data_dir / "jetstream"), "-a", "127.0.0.1", "-p", str(port)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=50, reconnect_time_wait=0.1)
        js = nc.jetstream()
        await js.add_stream(name="OLD", subjects=["old.>"])
        await js.publish("old.one", b"kept")
        await nc.close()
    finally:
        open_server.terminate()
        await open_server.wait()
    with EmbeddedNats(data_dir) as server:
        nc = await nats.connect(server.url)
        try:
            message = await nc.jetstream().get_msg("OLD", seq=1)
            assert message.data == b"kept"
        finally:
            await nc.close()


REPOSITORY = Path(__file__).resolve().parents[2]


async def test_the_compose_nats_config_is_valid_and_needs_its_password() -> None:
    config = REPOSITORY / "deploy" / "nats-server.conf"
    for environment, valid in (({"CP_NATS_PASSWORD": "a-password"}, True), ({}, False)):
        checked = await asyncio.create_subprocess_exec(
            *(str(nats_server_binary()), "-c", str(config), "-t"),
            env={"PATH": "/usr/bin:/bin", **environment},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await checked.communicate()
        assert (checked.returncode == 0) is valid, output.decode()
    text = config.read_text()
    assert all(f'"{export["service"]}"' in text for export in cp_exports())  # what org accounts import
    assert "no_auth_user" not in text


def test_compose_gives_every_process_a_login_and_no_password_on_a_command_line() -> None:
    services = yaml.safe_load((REPOSITORY / "compose.yaml").read_text())["services"]
    for name in ("provision", "projector", "gateway"):
        assert "${CP_NATS_PASSWORD" in services[name]["environment"]["CP_NATS_URL"], name
        assert not any("nats://" in str(part) for part in services[name]["command"]), name
    assert services["gateway"]["environment"]["DATABASE_URL"].startswith("postgresql://cp_gateway:")
    assert services["projector"]["environment"]["DATABASE_URL"].startswith("postgresql://cp_projector:")
    assert "controlplane" not in str(services["postgres"]["environment"]["POSTGRES_PASSWORD"]).lower()
