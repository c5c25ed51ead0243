"""``controlplane dev --cluster 3``: the whole stack on a three-node JetStream cluster, every stream
replicated on each node, serving through the loss of the log's leader, and leaving no nats-server
behind when SIGTERM stops it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from application.idempotency import BUCKET as IDEMPOTENCY_BUCKET
from controlplane.embedded import free_port
from core.log.store import STREAM_NAME, JetStreamEventStore
from integrations.consumer import DEAD_LETTER_STREAM

pytestmark = pytest.mark.integration

CLUSTER_NAME = "cp-cluster"
"""EmbeddedNatsCluster's default: node ``i`` is the server named ``cp-cluster-<i>``."""


def nats_servers_under(data_dir: Path) -> dict[int, int]:
    """Node index -> pid of each live nats-server whose config is ``data_dir / "nats-<i>"/...``."""
    config = re.compile(re.escape(str(data_dir)) + r"/nats-(\d+)/nats-server\.conf")
    found: dict[int, int] = {}
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            argv = (process / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # exited while we looked
            continue
        if Path(argv[0]).name != "nats-server":
            continue
        for argument in argv[1:]:
            if match := config.fullmatch(argument):
                found[int(match.group(1))] = int(process.name)
    return found


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


@dataclass
class DevStack:
    process: subprocess.Popen[bytes]
    info: dict[str, Any]
    data_dir: Path
    log_path: Path


@pytest.fixture
def dev_cluster(tmp_path: Path) -> Iterator[DevStack]:
    """``controlplane dev --cluster 3`` in a subprocess, once it has written dev.json. Whatever the
    test leaves running is killed afterwards."""
    data_dir = (tmp_path / "dev").resolve()
    log_path = tmp_path / "dev.log"
    command = [sys.executable, "-m", "controlplane", "dev", "--cluster", "3", "--port", str(free_port())]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, "--data-dir", str(data_dir)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while not (data_dir / "dev.json").exists():
            assert process.poll() is None, f"controlplane dev exited with {process.returncode}:\n{tail(log_path)}"
            assert time.monotonic() < deadline, f"controlplane dev wrote no dev.json in 90 s:\n{tail(log_path)}"
            time.sleep(0.2)
        yield DevStack(process, json.loads((data_dir / "dev.json").read_text()), data_dir, log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in nats_servers_under(data_dir).values():
            os.kill(pid, signal.SIGKILL)


async def until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.2)


async def submit_until_accepted(admin: httpx.AsyncClient, within: float) -> dict[str, Any]:
    """Submit a task, retrying while the gateway answers 503 (no log leader yet)."""
    async with asyncio.timeout(within):
        while True:
            response = await admin.post("/v1/tasks", json={"type": "deploy", "queue": "cluster"})
            if response.status_code != 503:
                assert response.status_code == 201, response.text
                task: dict[str, Any] = response.json()
                return task
            await asyncio.sleep(0.2)


async def test_dev_cluster_replicates_serves_through_a_dead_leader_and_stops_every_server(
    dev_cluster: DevStack,
) -> None:
    info, process = dev_cluster.info, dev_cluster.process
    servers = nats_servers_under(dev_cluster.data_dir)
    assert sorted(servers) == [0, 1, 2]
    assert len(info["nats_url"].split(",")) == 3

    store = await JetStreamEventStore.connect(info["nats_url"], provision=False)
    try:
        js = store.nc.jetstream()
        for stream in (STREAM_NAME, DEAD_LETTER_STREAM, f"KV_{IDEMPOTENCY_BUCKET}"):
            assert (await js.stream_info(stream)).config.num_replicas == 3, stream
        placement = (await js.stream_info(STREAM_NAME)).cluster
    finally:
        await store.close()
    assert placement is not None and placement.leader is not None
    assert placement.leader.startswith(f"{CLUSTER_NAME}-")

    headers = {"Authorization": f"Bearer {info['orgs']['acme']['admin']}"}
    async with httpx.AsyncClient(base_url=info["gateway_url"], headers=headers, timeout=30) as admin:
        before = await submit_until_accepted(admin, within=10)
        os.kill(servers[int(placement.leader.rsplit("-", 1)[1])], signal.SIGKILL)
        after = await submit_until_accepted(admin, within=30)
        assert (await admin.get(f"/v1/tasks/{before['id']}")).json()["status"] == "pending"

        async def projected() -> bool:
            """The projector, a process of its own, follows the log through the failover too."""
            listed = await admin.get("/v1/tasks", params={"queue": "cluster", "min_seq": after["seq"]})
            if listed.status_code == 503:  # not there yet
                return False
            assert listed.status_code == 200, listed.text
            assert {task["id"] for task in listed.json()["items"]} == {before["id"], after["id"]}
            return True

        await until(projected, within=30)

    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0, tail(dev_cluster.log_path)
    assert nats_servers_under(dev_cluster.data_dir) == {}, "every nats-server of the cluster stopped"
    assert not [pid for pid in servers.values() if alive(pid)]
