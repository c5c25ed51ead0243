"""The ``controlplane`` command: wires core, projections, gateway and runners into processes."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from core.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    NatsVersionTooOld,
    database_url_from_env,
    nats_server_binary,
    nats_server_version,
    require_nats_version,
)
from core.store import JetStreamEventStore

log = logging.getLogger("controlplane")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser(
        "dev",
        help="start the whole stack on embedded defaults, in the foreground",
        description="Start NATS (JetStream) and PostgreSQL, provision the log, write DIR/dev.json. "
        "Ctrl-C or SIGTERM stops everything cleanly; data in DIR survives a restart.",
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080, help="gateway port")
    dev.add_argument("--data-dir", type=Path, default=Path(".controlplane"))

    provision = commands.add_parser("provision", help="create or update the CP_EVENTS stream")
    provision.add_argument("--nats-url", required=True)
    provision.add_argument("--replicas", type=int, default=1)

    commands.add_parser("doctor", help="check that the tools the stack needs are present and recent enough")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        match args.command:
            case "dev":
                return run_dev(args.host, args.port, args.data_dir)
            case "provision":
                return uvloop.run(_provision(args.nats_url, args.replicas))
            case "doctor":
                return doctor()
    except (NatsVersionTooOld, FileNotFoundError) as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 2
    return 1


def doctor() -> int:
    binary = nats_server_binary()
    version = nats_server_version(binary)
    require_nats_version(version)
    print(f"nats-server {version} at {binary}: ok (message schedules and atomic batches available)")
    print(f"DATABASE_URL: {'set' if database_url_from_env() else 'not set; an embedded PostgreSQL will be used'}")
    return 0


async def _provision(nats_url: str, replicas: int) -> int:
    store = await JetStreamEventStore.connect(nats_url, provision=False)
    try:
        await store.provision(replicas=replicas)
        print(f"stream {store.stream} ready on {nats_url}")
    finally:
        await store.close()
    return 0


def run_dev(host: str, port: int, data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedNats(data_dir / "nats") as nats_server:
        database_url = database_url_from_env()
        postgres = None if database_url else EmbeddedPostgres(data_dir / "postgres")
        try:
            if postgres is not None:
                database_url = postgres.start()
            assert database_url is not None
            return uvloop.run(_serve_dev(nats_server.url, database_url, data_dir))
        finally:
            # A second Ctrl-C must not cut the shutdown short and leave servers running.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if postgres is not None:
                postgres.stop()


async def _serve_dev(nats_url: str, database_url: str, data_dir: Path) -> int:
    store = await JetStreamEventStore.connect(nats_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    info = {"nats_url": nats_url, "database_url": database_url}
    (data_dir / "dev.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"controlplane dev is up (data in {data_dir}):")
    for name, value in info.items():
        print(f"  {name}: {value}")
    print("Ctrl-C stops it.")
    await stop.wait()
    async with asyncio.timeout(5):
        await store.close()
    print("controlplane dev stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
