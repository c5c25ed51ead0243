"""A JetStream cluster of embedded nats-servers on one machine, for development, tests and benchmarks.

Each node is an ``EmbeddedNats`` with its own data under ``data_dir / "nats-<i>"``, routed to every
other node; together they elect a JetStream meta leader and hold replicated (R3) streams. A node can
be killed and started again (same ports, same data), which is what failover tests need."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from controlplane.embedded import EmbeddedNats, EmbeddedService, free_port, log_tail, stored_login

_READY_TIMEOUT_SECONDS = 30.0
# An explicit empty ProxyHandler: an http_proxy in the environment must not intercept 127.0.0.1.
_monitor = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmbeddedNatsCluster(EmbeddedService):
    """``size`` nats-servers routed to each other in one JetStream cluster. ``with`` starts every node
    and returns once all are current; leaving the block stops every node by PID."""

    def __init__(
        self,
        data_dir: Path,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        name: str = "cp-cluster",
        accounts: dict[str, Any] | None = None,
        exports: list[dict[str, Any]] | None = None,
    ) -> None:
        if size < 2:
            raise ValueError(f"a cluster needs at least 2 nodes, not {size}; use EmbeddedNats for one server")
        cluster_ports: set[int] = set()
        while len(cluster_ports) < size:  # the kernel may report the same free port twice
            cluster_ports.add(free_port(host))
        ports = sorted(cluster_ports)
        self.names = [f"{name}-{index}" for index in range(size)]
        self.login = stored_login(Path(data_dir) / "nats-login.json")
        """One login for every node: a client fails over between them with the same URL."""
        """Server names by node index, as the JetStream API reports leaders and peers."""
        self.nodes = [
            EmbeddedNats(
                Path(data_dir) / f"nats-{index}",
                host=host,
                server_name=self.names[index],
                cluster_port=own_port,
                routes=[f"nats-route://{host}:{port}" for port in ports if port != own_port],
                cluster_name=name,
                login=self.login,
                accounts=accounts,
                exports=exports,
            )
            for index, own_port in enumerate(ports)
        ]

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-joined: what ``JetStreamEventStore.connect``, ``--nats-url`` and
        dev.json carry (nats-py itself wants ``urls.split(",")``)."""
        return ",".join(node.url for node in self.nodes)

    def start(self, index: int | None = None) -> None:
        """Start every node (``index=None``) or bring node ``index`` back after ``kill``; return once the
        started nodes are current (see ``_wait_until_current``): a restarted node has caught up."""
        indexes = range(len(self.nodes)) if index is None else [index]
        started: list[EmbeddedNats] = []
        try:
            for i in indexes:
                try:
                    self.nodes[i].start()
                except Exception as exc:
                    raise RuntimeError(f"cluster node {i} ({self.names[i]}) failed to start: {exc}") from exc
                started.append(self.nodes[i])
            self._wait_until_current(indexes)
        except BaseException:
            for node in started:
                node.kill()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``, as a crash would."""
        self.nodes[index].kill()

    def stream_leader(self, stream: str) -> int | None:
        """The index of the node leading ``stream``, or None while it has no leader (an election is
        under way). Only a node's word about itself counts: a follower may still name a dead leader."""
        for index in self._live():
            detail = self._stream_detail(index, stream)
            if detail is not None and detail.get("cluster", {}).get("leader") == self.names[index]:
                return index
        return None

    def stream_last_seq(self, index: int, stream: str) -> int | None:
        """The last sequence of ``stream`` as node ``index`` stores it; None if it holds no replica."""
        detail = self._stream_detail(index, stream)
        return None if detail is None else int(detail["state"]["last_seq"])

    def _live(self) -> list[int]:
        return [index for index, node in enumerate(self.nodes) if node.is_running]

    def _stream_detail(self, index: int, stream: str) -> dict[str, Any] | None:
        query = urllib.parse.urlencode({"accounts": "true", "streams": "true"})
        with _monitor.open(f"{self.nodes[index].monitor_url}/jsz?{query}", timeout=2) as response:
            jsz = json.load(response)
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return dict(detail)
        return None

    def _wait_until_current(self, indexes: Iterable[int]) -> None:
        """Until each node's full health check passes: it follows a JetStream meta leader and every
        stream and consumer it holds a replica of has a leader and is caught up. Only then do stream
        requests (creating, updating, appending) get answers instead of timeouts."""
        waiting = {index: "not asked yet" for index in indexes}
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        while waiting and time.monotonic() < deadline:
            for index in list(waiting):
                try:
                    with _monitor.open(f"{self.nodes[index].monitor_url}/healthz", timeout=2):
                        del waiting[index]  # 200: any other status raises
                except urllib.error.HTTPError as unhealthy:
                    waiting[index] = unhealthy.read().decode(errors="replace")
                except OSError as unreachable:
                    waiting[index] = repr(unreachable)
            if waiting:
                time.sleep(0.1)
        if not waiting:
            return
        report = "\n".join(
            f"node {index} ({self.names[index]}): {reason}\nlast lines of {self.nodes[index].log_path}:\n"
            f"{log_tail(self.nodes[index].log_path)}"
            for index, reason in waiting.items()
        )
        raise RuntimeError(
            f"cluster nodes {sorted(waiting)} were not healthy within {_READY_TIMEOUT_SECONDS:.0f}s; check that "
            f"their cluster ports are reachable.\n{report}"
        )
