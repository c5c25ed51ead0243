"""Long-running processes: the gateway, the projector, and the whole dev stack in one process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import asyncpg
import msgspec
import uvicorn

from controlplane.connection import without_credentials
from controlplane.dev_nats import DevNats
from controlplane.embedded import stored_login, write_private
from controlplane.seed import seed_org
from core.log.store import JetStreamEventStore
from core.secret_box import MASTER_KEY_ENV, PREVIOUS_KEYS_ENV, generate_key_text
from gateway.app import build_app
from gateway.factory import GatewaySettings, close_services, open_services
from gateway.observe import ACCESS_LOG_ENV
from gateway.services import Services
from projections.projector import Projector
from projections.roles import GATEWAY_ROLE, LOGIN_ROLES, PROJECTOR_ROLE, login_url, provision_login_roles
from projections.schema import migrate
from projections.shards import Shard
from runners.client import TaskApi
from runners.registry import Registry
from runners.runner import Runner

log = logging.getLogger("controlplane")

DEV_ORGS = ("acme", "globex")
DEV_ROLES = ("admin", "submitter", "worker", "approver", "viewer")
SECRETS_KEY_FILE = "secrets.key"
WORKER_KEY_ENV = "CP_WORKER_KEY"
"""Where ``controlplane runner`` finds its key: an environment variable, never the command line."""


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


class _Server(uvicorn.Server):
    """uvicorn's own signal handling would close connections at the first Ctrl-C, before the runner
    that talks to this gateway has drained; the process's signal handlers decide the order instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_http(
    services: Services, host: str, port: int, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """Serve until ``stop``; ``ready`` is set once requests are being answered."""
    # Bind here, not inside uvicorn: a taken port is then an OSError we can explain, not a sys.exit.
    listener = socket.create_server((host, port))
    # log_config=None: uvicorn's own lines go through the process's handler (JSON or text), not a second format.
    # httptools parses HTTP in C; uvicorn's pure-Python fallback (h11) showed in every profile of the gateway.
    config = uvicorn.Config(
        build_app(services), http="httptools", log_level="warning", lifespan="off", access_log=False, log_config=None
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn offers no startup event
        await asyncio.sleep(0.02)
    if ready is not None:
        ready.set()
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving


async def run_gateway(settings: GatewaySettings, host: str, port: int) -> int:
    stop = stop_on_signals()
    services = await open_services(settings)
    try:
        log.info("gateway listening on http://%s:%d", host, port)
        await serve_http(services, host, port, stop)
    finally:
        await close_services(services)
    return 0


async def run_projector(settings: GatewaySettings, shard: Shard | None = None) -> int:
    """Fold the log into PostgreSQL until a signal; with ``shard``, only that shard's orgs."""
    stop = stop_on_signals()
    # Only the log and the database: a projector serves no requests, so it needs no claim index, policy engine or keys.
    store = await JetStreamEventStore.connect(settings.nats_url)
    # One connection leads and writes the projections; the others answer lag and checkpoint reads.
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=3)
    projector = Projector(pool, store.nc, shard=shard)
    try:
        await projector.start()
        log.info("projector running" if shard is None else f"projector running shard {shard}")
        await stop.wait()
    finally:
        await projector.stop()
        await pool.close()
        await store.close()
    return 0


async def run_runner(
    url: str, key: str, queue: str, topics: list[str], worker_id: str, concurrency: int, lease_seconds: float
) -> int:
    registry = Registry.load(topics)
    stop = stop_on_signals()
    api = TaskApi(url, key)
    try:
        log.info("runner %s on queue %r hosts %s", worker_id, queue, registry.capabilities())
        runner = Runner(
            api, registry, worker_id=worker_id, queue=queue, concurrency=concurrency, lease_seconds=lease_seconds
        )
        await runner.run(stop)
    finally:
        await api.close()
    return 0


async def run_dev(
    settings: GatewaySettings,
    host: str,
    port: int,
    data_dir: Path,
    known: dict[str, dict[str, str]],
    servers: DevNats,
) -> int:
    """Gateway in this process, projector in a child process: each gets a core of its own. ``known``
    holds the keys of the previous run, kept when the log still has them."""
    # The dev terminal is a person's: a line for every runner long-poll would bury what matters.
    # CP_ACCESS_LOG=1 brings the access log back; `controlplane gateway` keeps it on by default.
    os.environ.setdefault(ACCESS_LOG_ENV, "0")
    stop = stop_on_signals()
    logins = await database_logins(settings.database_url, stored_passwords(data_dir / "postgres-logins"))
    services = await open_services(dataclasses.replace(settings, database_url=logins[GATEWAY_ROLE]))
    # URLs may hold passwords: children get them, like the runner its key, in their environment, not in
    # arguments that every local user can read.
    projector = await start_child(
        ["projector"],
        data_dir / "projector.log",
        env={"CP_NATS_URL": settings.nats_url, "DATABASE_URL": logins[PROJECTOR_ROLE]},
    )
    runner: asyncio.subprocess.Process | None = None
    notifier: asyncio.subprocess.Process | None = None
    try:
        info_path = data_dir / "dev.json"
        orgs = {org: await seed_org(services.handler, org, DEV_ROLES, known.get(org)) for org in DEV_ORGS}
        async with asyncio.timeout(60):
            await Projector(services.read_model.pool, services.store.nc).run_until_caught_up()
        info = {
            "gateway_url": f"http://{host}:{port}",
            "nats_url": settings.nats_url,
            "database_url": settings.database_url,
            "database_logins": {"gateway": logins[GATEWAY_ROLE], "projector": logins[PROJECTOR_ROLE]},
            "orgs": orgs,
            "nats_integrations": msgspec.to_builtins(servers.integrations),
        }
        ready, http_stop = asyncio.Event(), asyncio.Event()
        serving = asyncio.create_task(serve_http(services, host, port, http_stop, ready))
        await asyncio.wait({serving, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # it could not start (a taken port): say why
        runner = await start_child(
            [
                "runner",
                "--url",
                info["gateway_url"],
                "--workflows",
                "runners.examples:EXAMPLES",
                "--worker-id",
                "dev-runner",
            ],
            data_dir / "runner.log",
            env={WORKER_KEY_ENV: orgs["acme"]["worker"]},
        )
        # Sends each seeded org's notifications once an admin defines channels and rules; it reads and
        # appends to the log, so it logs in as the control plane (docs/adr/0010-notifications.md).
        notifier = await start_child(
            ["notify", *DEV_ORGS, "--url", info["gateway_url"]],
            data_dir / "notify.log",
            # The master key opens channels' sealed URLs and secrets; this child alone gets it.
            env={
                "CP_NATS_URL": settings.nats_url,
                MASTER_KEY_ENV: settings.secrets_key or "",
                PREVIOUS_KEYS_ENV: settings.secrets_previous_keys or "",
            },
        )
        write_private(info_path, json.dumps(info, indent=2) + "\n")  # it holds every key
        print(f"controlplane dev is up (data in {data_dir}, details in {info_path}):")
        print(f"  console:  {info['gateway_url']}/console  (sign in with acme's approver key to decide approvals)")
        print(f"  gateway:  {info['gateway_url']}  (docs at {info['gateway_url']}/docs)")
        print(f"  nats:     {servers.address}  (logins for the control plane and each org's integrations in dev.json)")
        print(f"  postgres: {without_credentials(settings.database_url)}")
        print(f"  projector: pid {projector.pid}, log {data_dir / 'projector.log'}")
        print(
            f"  runner:   pid {runner.pid}, example workflows agent-deploy, two-person-change and agent-chat"
            f" on acme/default, log {data_dir / 'runner.log'}"
        )
        print(f"  notifier: pid {notifier.pid}, notifications of {', '.join(DEV_ORGS)}, log {data_dir / 'notify.log'}")
        for org, keys in orgs.items():
            print(f"  {org}: " + ", ".join(f"{role}={key}" for role, key in keys.items()))
        print("Ctrl-C stops everything.", flush=True)
        await asyncio.wait({serving, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        # The runner talks to the gateway: it goes first, then the gateway, then the projector.
        await stop_process(runner)
        http_stop.set()
        await serving
    finally:
        if runner is not None:
            await stop_process(runner)
        if notifier is not None:
            await stop_process(notifier)
        await stop_process(projector)
        await close_services(services)
    print("controlplane dev stopped", flush=True)
    return 0


async def database_logins(owner_url: str, passwords: Mapping[str, str]) -> dict[str, str]:
    """Migrate as the owner, then give the gateway and the projector their own login roles; their URLs
    by role. An owner that may not create roles (an outside database without CREATEROLE) keeps doing
    everything, with a warning."""
    conn = await asyncpg.connect(owner_url)
    try:
        await migrate(conn)
        try:
            await provision_login_roles(conn, passwords)
        except asyncpg.InsufficientPrivilegeError as exc:
            log.warning("cannot create the login roles (%s): the gateway and projector use the owner's login", exc)
            return dict.fromkeys(passwords, owner_url)
    finally:
        await conn.close()
    return {role: login_url(owner_url, role, password) for role, password in passwords.items()}


def stored_secrets_key(data_dir: Path) -> str:
    """The dev stack's master key for secrets (``CP_SECRETS_KEY``), made once into ``secrets.key``
    (mode 0600): secrets set in one run open in the next. It reaches the gateway through the
    environment, never a command line."""
    path = data_dir / SECRETS_KEY_FILE
    if not path.exists():
        write_private(path, generate_key_text() + "\n")
    return path.read_text().strip()


def stored_passwords(login_dir: Path) -> dict[str, str]:
    """The dev stack's database passwords, one file per login role, made on first use."""
    return {role: stored_login(login_dir / f"{role}.json", role).password for role in LOGIN_ROLES}


async def start_child(
    arguments: list[str], log_path: Path, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Another ``controlplane`` process (its own core), logging to ``log_path``, with ``env`` added to
    this process's environment: the place for keys and passwords, which arguments would show in ps."""
    with log_path.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controlplane",
            *arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # stopped by us, in order, not by the terminal's Ctrl-C
        )


async def stop_process(process: asyncio.subprocess.Process, grace: float = 15.0) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        async with asyncio.timeout(grace):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
