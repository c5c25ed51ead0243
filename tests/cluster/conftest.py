"""A three-node JetStream cluster per test module, and clients of it.

Tests here kill and restart nodes, so the cluster is the module's own, never shared with the rest of
the suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from controlplane.cluster import EmbeddedNatsCluster
from core.log.store import JetStreamEventStore


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsCluster]:
    with EmbeddedNatsCluster(tmp_path_factory.mktemp("cluster"), size=3) as started:
        yield started


@pytest.fixture
async def stores(cluster: EmbeddedNatsCluster) -> AsyncIterator[list[JetStreamEventStore]]:
    """One client per node, each connected to its own node first (the others are its fallbacks), so a
    killed node always has a client that must move; the log is provisioned with three replicas."""
    urls = cluster.urls.split(",")
    opened = [
        await JetStreamEventStore.connect(urls[index:] + urls[:index], provision=False, dont_randomize=True)
        for index in range(len(urls))
    ]
    await opened[0].provision(replicas=len(urls))
    yield opened
    for store in opened:
        await store.close()
