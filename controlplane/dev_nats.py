"""The dev stack's NATS: one server or a replicated cluster, never open to anonymous clients.

The control plane's processes log in as the log account's user (its password is kept under the data
directory and travels to child processes in their environment, never in arguments). Each seeded org
gets an account of its own with one confined integration user, exactly what ``controlplane
nats-config`` describes: it can read only its org's events through its own consumers. ``dev.json``
lists those logins so an integration can be tried at once."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from application.idempotency import BUCKET as IDEMPOTENCY_BUCKET
from application.idempotency import IdempotencyRecords
from controlplane.cluster import EmbeddedNatsCluster
from controlplane.embedded import EmbeddedNats, stored_login
from core.log.store import JetStreamEventStore
from integrations.consumer import CONFINED_JS_API_PREFIX, consumer_name, provision_dead_letter_stream
from integrations.permissions import (
    DEFAULT_INTEGRATION_NAMES,
    cp_exports,
    default_user,
    integration_user,
    org_account,
    org_account_name,
)


class IntegrationLogin(msgspec.Struct, frozen=True):
    """How an org's confined integration connects (``controlplane webhook --confined``)."""

    user: str
    password: str
    js_api_prefix: str
    consumers: list[str]


@dataclasses.dataclass(frozen=True)
class DevNats:
    url: str
    """Comma-separated client URLs with the control plane's login: for processes, never for logs."""
    address: str
    """The same servers without credentials, for people."""
    integrations: dict[str, IntegrationLogin]


def integration_logins(data_dir: Path, orgs: Iterable[str]) -> dict[str, IntegrationLogin]:
    """One confined user per org, with a password kept under ``data_dir`` across restarts."""
    names = list(DEFAULT_INTEGRATION_NAMES)
    return {
        org: IntegrationLogin(
            user=default_user(org),
            password=stored_login(data_dir / f"integration-{org}.json", default_user(org)).password,
            js_api_prefix=CONFINED_JS_API_PREFIX,
            consumers=[consumer_name(org, name) for name in names],
        )
        for org in orgs
    }


def org_accounts(logins: dict[str, IntegrationLogin]) -> dict[str, Any]:
    return {
        org_account_name(org): org_account(org, [integration_user(org, user=login.user, password=login.password)])
        for org, login in logins.items()
    }


@contextlib.contextmanager
def dev_nats(data_dir: Path, cluster_size: int, orgs: Iterable[str]) -> Iterator[DevNats]:
    """One nats-server, or a cluster with every stream replicated on each node, with the log account,
    one account per org and the dead-letter stream the confined integrations need."""
    wanted = {"nats"} if cluster_size == 1 else {f"nats-{index}" for index in range(cluster_size)}
    found = {path.name for path in data_dir.iterdir() if re.fullmatch(r"nats(-\d+)?", path.name)}
    if found and found != wanted:
        # Another layout would start an empty log next to read models and keys that remember the old one.
        raise ValueError(
            f"{data_dir} holds the log of another NATS layout ({', '.join(sorted(found))}); run with the --cluster "
            f"size that wrote it, or use another --data-dir"
        )
    logins = integration_logins(data_dir / "nats-logins", orgs)
    accounts, exports = org_accounts(logins), cp_exports()
    if cluster_size == 1:
        with EmbeddedNats(data_dir / "nats", accounts=accounts, exports=exports) as server:
            uvloop.run(provision_streams(server.url, 1))
            yield DevNats(server.url, server.address, logins)
        return
    with EmbeddedNatsCluster(data_dir, size=cluster_size, accounts=accounts, exports=exports) as cluster:
        uvloop.run(provision_streams(cluster.urls, cluster_size))
        addresses = ",".join(node.address for node in cluster.nodes)
        yield DevNats(cluster.urls, addresses, logins)


async def provision_streams(nats_url: str, replicas: int) -> str:
    """Create the log and the dead-letter stream with ``replicas`` copies before any process creates
    them with one, and scale the gateway's idempotency bucket, which the gateway creates with one.
    Returns the log stream's name."""
    store = await JetStreamEventStore.connect(nats_url, provision=False)
    try:
        await store.provision(replicas=replicas)
        js = store.nc.jetstream()
        await provision_dead_letter_stream(js, replicas=replicas)
        if replicas == 1:
            return store.stream
        await IdempotencyRecords.open(store)
        bucket = await js.stream_info(f"KV_{IDEMPOTENCY_BUCKET}")
        if bucket.config.num_replicas != replicas:
            await js.update_stream(dataclasses.replace(bucket.config, num_replicas=replicas))
        return store.stream
    finally:
        await store.close()
