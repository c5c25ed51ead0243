"""The ``controlplane`` command: wires core, projections, gateway and runners into processes."""

from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import nats.errors
import uvloop

from controlplane import environments as environment_commands
from controlplane import exec as exec_commands
from controlplane import integrations as integration_commands
from controlplane import notify as notify_commands
from controlplane import policies as policy_commands
from controlplane import queues as queue_commands
from controlplane import replay as replay_commands
from controlplane import schedules as schedule_commands
from controlplane import secrets as secret_commands
from controlplane import stack
from controlplane import timers as timer_commands
from controlplane.connection import (
    database_url_argument,
    gateway_url_argument,
    key_arguments,
    key_from,
    nats_url_argument,
    without_credentials,
)
from controlplane.dev_nats import dev_nats, provision_streams
from controlplane.embedded import nats_server_binary, nats_server_version
from controlplane.embedded_postgres import EmbeddedPostgres, database_url_from_env
from controlplane.logs import configure_logging
from controlplane.progress import progress_bar
from controlplane.seed import seed_org
from controlplane.stack import DEV_ORGS, WORKER_KEY_ENV, run_gateway, run_projector, run_runner
from controlplane.tracing import configure_tracing
from core.domain.commands import SYSTEM, CreateOrg, ResumeTask
from core.domain.errors import AlreadyExists, Rejected
from core.domain.ids import InvalidToken, validate_token
from core.log.handler import CommandHandler
from core.log.nats_version import NatsVersionTooOld, require_nats_version
from core.log.store import JetStreamEventStore
from gateway.factory import GatewaySettings, close_services, open_services
from integrations.consumer import DEAD_LETTER_STREAM
from projections.rebuild import rebuild
from projections.roles import DB_PASSWORD_ENV, GATEWAY_ROLE, PROJECTOR_ROLE, provision_login_roles
from projections.schema import migrate
from projections.shards import Shard, parse_shard


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser(
        "dev",
        help="start the whole stack on embedded defaults, in the foreground",
        description="Start NATS (JetStream) and PostgreSQL, migrations, the projector and the gateway; seed the "
        "orgs acme and globex with a key per role; write DIR/dev.json. Ctrl-C or SIGTERM stops everything "
        "cleanly; data in DIR survives a restart.",
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080, help="gateway port")
    dev.add_argument("--data-dir", type=Path, default=Path(".controlplane"))
    dev.add_argument(
        "--cluster",
        type=int,
        default=1,
        metavar="N",
        help="run N nats-servers as one JetStream cluster, every stream replicated on each (default: 1 server)",
    )

    for name, text in (("gateway", "serve the HTTP/SSE API"), ("projector", "fold the log into PostgreSQL")):
        process = commands.add_parser(name, help=text)
        _connection_args(process, login=name)
        if name == "gateway":
            process.add_argument("--host", default="127.0.0.1")
            process.add_argument("--port", type=int, default=8080)
        else:
            process.add_argument(
                "--shard",
                type=_shard,
                help="INDEX/COUNT: fold only the orgs of this shard (e.g. 1/2 and 2/2 in two processes)",
            )

    runner = commands.add_parser(
        "runner",
        help="run workflows: claim their tasks, replay, continue",
        description=f"Example: {WORKER_KEY_ENV}=cp_... controlplane runner --url http://127.0.0.1:8080 "
        f"--workflows runners.examples:EXAMPLES. The worker key comes from ${WORKER_KEY_ENV} (or $CP_API_KEY) "
        "or --key-file: never the command line, which every local user can read.",
    )
    gateway_url_argument(runner)
    key_arguments(runner, WORKER_KEY_ENV, "worker key")
    runner.add_argument("--queue", default="default")
    runner.add_argument("--workflows", action="append", required=True, help="module:attr, repeatable")
    runner.add_argument("--worker-id", default=f"runner-{os.getpid()}")
    runner.add_argument("--concurrency", type=int, default=4)
    runner.add_argument("--lease-seconds", type=float, default=30.0, help="how long a dead runner holds a task")

    tasks = commands.add_parser("tasks", help="operate on tasks").add_subparsers(dest="tasks_command", required=True)
    resume = tasks.add_parser("resume", help="un-park a task after fixing its workflow code")
    resume.add_argument("org")
    resume.add_argument("task_id")
    _connection_args(resume, database=False)

    orgs = commands.add_parser("orgs", help="manage orgs").add_subparsers(dest="orgs_command", required=True)
    create_org = orgs.add_parser("create", help="create an org and print its first admin key")
    create_org.add_argument("org")
    _connection_args(create_org, database=False)

    projections = commands.add_parser("projections", help="manage read models").add_subparsers(
        dest="projections_command", required=True
    )
    rebuild = projections.add_parser(
        "rebuild",
        help="drop and refold read models from sequence 1",
        description="Stop the projector first. Example: controlplane projections rebuild tasks",
    )
    rebuild.add_argument("names", nargs="*", help="projections to rebuild (default: all)")
    _connection_args(rebuild)

    provision = commands.add_parser("provision", help="create or update the CP_EVENTS stream")
    nats_url_argument(provision)
    provision.add_argument("--replicas", type=int, default=1)

    migrate_command = commands.add_parser(
        "migrate",
        help="apply the read model's migrations, as the owner of its tables",
        description="Run with the owner's DATABASE_URL before starting gateways and projectors that log in as "
        f"least-privilege roles. With --login-roles, also create or update {GATEWAY_ROLE} (reads through "
        f"row-level security) and {PROJECTOR_ROLE} (writes rows, no DDL), with the passwords in "
        f"${DB_PASSWORD_ENV[GATEWAY_ROLE]} and ${DB_PASSWORD_ENV[PROJECTOR_ROLE]}.",
    )
    database_url_argument(migrate_command)
    migrate_command.add_argument("--login-roles", action="store_true", help="create the gateway and projector roles")
    commands.add_parser("doctor", help="check that the tools the stack needs are present and recent enough")
    replay_commands.register(commands)
    policy_commands.register(commands)
    environment_commands.register(commands)
    queue_commands.register(commands)
    schedule_commands.register(commands)
    secret_commands.register(commands)
    exec_commands.register(commands)
    timer_commands.register(commands)
    integration_commands.register(commands)
    notify_commands.register(commands)

    args = parser.parse_args(argv)
    process = args.command if args.command in SERVICES else "cli"
    try:
        log_format = configure_logging(process)
    except ValueError as exc:  # a CP_LOG_FORMAT or CP_LOG_LEVEL that means nothing
        print(f"controlplane: {exc}", file=sys.stderr)
        return 2
    stop_tracing = configure_tracing(process) if process in SERVICES else None
    if process in SERVICES:
        settle_heap()
    try:
        return _run(args)
    except (NatsVersionTooOld, FileNotFoundError, InvalidToken, ValueError) as exc:
        _report(log_format, f"controlplane: {exc}")
        return 2
    except (OSError, asyncpg.PostgresError, nats.errors.Error) as exc:
        _report(log_format, f"controlplane: {_unreachable(exc)}")
        return 3
    finally:
        if stop_tracing is not None:
            stop_tracing()


SERVICES = ("gateway", "projector", "runner", "dev", "notify")
"""Commands that run until stopped: their log lines name them as the process, and they trace."""


YOUNG_COLLECTION_THRESHOLD = 20_000
"""Container allocations (net) between two collections of the youngest generation; CPython's default
is 700. A service holds hundreds of requests, fires or events in flight at once, so a young collection
mostly walks objects still in use and promotes them. Measured in the gateway: 0.56 s of collections in
a 2,000-task lifecycle run and 80 to 105 ms in each burst of 1,000 schedule fires at 700; 0.15 s and
12 to 23 ms at 20,000. Most garbage is freed by reference counting, without a collection at all."""


def settle_heap() -> None:
    """For a process that runs until stopped. What start-up built (modules, their tables) lives as long
    as the process: moved out of the collector's sight, a full collection walks only what the process
    built since (each took ~90 ms in the gateway, a pause every request in flight waited out). And the
    young generation is collected less often (see ``YOUNG_COLLECTION_THRESHOLD``); the older ones keep
    CPython's ratios to it."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)


def _report(log_format: str | None, text: str) -> None:
    """Why the command failed, on stderr: a JSON line when the logs are JSON (so a collector reading
    the stream never meets a line it cannot parse), else the text itself."""
    if log_format == "json":
        logging.getLogger("controlplane").error(text)
    else:
        print(text, file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    if (run := getattr(args, "run", None)) is not None:  # commands that bring their own entry point
        return int(run(args))
    match args.command:
        case "dev":
            return run_dev(args.host, args.port, args.data_dir, args.cluster)
        case "gateway":
            return uvloop.run(run_gateway(_settings(args), args.host, args.port))
        case "projector":
            return uvloop.run(run_projector(_settings(args), args.shard))
        case "runner":
            key = key_from(args, os.environ, WORKER_KEY_ENV, "CP_API_KEY")
            os.environ.pop(WORKER_KEY_ENV, None)  # not inherited by whatever the workflows start
            return uvloop.run(
                run_runner(
                    args.url,
                    key,
                    args.queue,
                    args.workflows,
                    args.worker_id,
                    args.concurrency,
                    args.lease_seconds,
                )
            )
        case "tasks":
            return uvloop.run(_resume(args.nats_url, args.org, args.task_id))
        case "orgs":
            return uvloop.run(_create_org(args.nats_url, args.org))
        case "projections":
            return uvloop.run(_rebuild(_settings(args), args.names))
        case "provision":
            return uvloop.run(_provision(args.nats_url, args.replicas))
        case "migrate":
            return uvloop.run(_migrate(args.database_url, args.login_roles))
        case "doctor":
            return doctor()
    return 1


def _unreachable(exc: BaseException) -> str:
    """What went wrong with a server connection, and what to check."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"the port is already in use ({exc}); pick another with --port"
    if isinstance(exc, asyncpg.PostgresError | ConnectionRefusedError) or "postgres" in repr(exc).lower():
        return f"cannot use PostgreSQL ({exc!r}); check --database-url / DATABASE_URL"
    return f"cannot reach a server ({exc!r}); check --nats-url and --database-url"


def _shard(text: str) -> Shard:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _connection_args(parser: argparse.ArgumentParser, *, database: bool = True, login: str | None = None) -> None:
    nats_url_argument(parser)
    if database:
        database_url_argument(parser, login)


def _settings(args: argparse.Namespace) -> GatewaySettings:
    if not args.database_url:
        raise ValueError("set --database-url or DATABASE_URL")
    return GatewaySettings.from_env(args.nats_url, args.database_url)


def doctor() -> int:
    binary = nats_server_binary()
    version = nats_server_version(binary)
    require_nats_version(version)
    print(f"nats-server {version} at {binary}: ok (message schedules and atomic batches available)")
    print(f"DATABASE_URL: {'set' if database_url_from_env() else 'not set; an embedded PostgreSQL will be used'}")
    return 0


async def _provision(nats_url: str, replicas: int) -> int:
    stream = await provision_streams(nats_url, replicas)
    print(f"streams {stream} and {DEAD_LETTER_STREAM} ready on {without_credentials(nats_url)}")
    return 0


async def _migrate(database_url: str | None, login_roles: bool) -> int:
    if not database_url:
        raise ValueError("give the owner's --database-url or DATABASE_URL")
    passwords = {role: os.environ.get(variable, "") for role, variable in DB_PASSWORD_ENV.items()}
    if login_roles and not all(passwords.values()):
        raise ValueError(f"--login-roles needs ${' and $'.join(DB_PASSWORD_ENV.values())}")
    conn = await asyncpg.connect(database_url)
    try:
        applied = await migrate(conn)
        print(f"migrations applied now: {applied or 'none (the schema is current)'}")
        if login_roles:
            await provision_login_roles(conn, passwords)
            print(f"login roles ready: {', '.join(passwords)} on {without_credentials(database_url)}")
    finally:
        await conn.close()
    return 0


async def _create_org(nats_url: str, org: str) -> int:
    validate_token(org, "org")
    store = await JetStreamEventStore.connect(nats_url)
    try:
        handler = CommandHandler(store)
        try:
            await handler.handle(org, CreateOrg(org=org, name=org), actor=SYSTEM)
        except AlreadyExists:
            print(f"controlplane: org {org} already exists; create more keys with POST /v1/api-keys", file=sys.stderr)
            return 1
        keys = await seed_org(handler, org, ("admin",))
        print(keys["admin"])
    finally:
        await store.close()
    return 0


async def _resume(nats_url: str, org: str, task_id: str) -> int:
    store = await JetStreamEventStore.connect(nats_url)
    try:
        outcome = await CommandHandler(store).handle(org, ResumeTask(task_id=task_id), actor=SYSTEM)
        print(f"task {task_id} resumed at seq {outcome.seq}; a runner will claim and replay it")
    except Rejected as exc:
        print(f"controlplane: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


async def _rebuild(settings: GatewaySettings, names: list[str]) -> int:
    services = await open_services(settings)
    try:
        await rebuild(services.read_model.pool, services.store.nc, names or None, progress_bar())
    finally:
        await close_services(services)
    return 0


def run_dev(host: str, port: int, data_dir: Path, cluster_size: int = 1) -> int:
    if cluster_size < 1:
        raise ValueError(f"--cluster needs at least 1 node, not {cluster_size}")
    data_dir.mkdir(parents=True, exist_ok=True)
    # dev.json means "ready": one left by the previous run must not be mistaken for this one.
    info_path = data_dir / "dev.json"
    known = json.loads(info_path.read_text()).get("orgs", {}) if info_path.exists() else {}
    info_path.unlink(missing_ok=True)
    with dev_nats(data_dir, cluster_size, DEV_ORGS) as servers:
        database_url = database_url_from_env()
        postgres = None if database_url else EmbeddedPostgres(data_dir / "postgres")
        try:
            if postgres is not None:
                database_url = postgres.start()
            assert database_url is not None
            settings = GatewaySettings.from_env(servers.url, database_url)
            if settings.secrets_key is None:
                # The gateway runs in this process: the key goes to it in memory, not into os.environ,
                # which the runner and projector children inherit (workflow code has no use for it).
                settings.secrets_key = stack.stored_secrets_key(data_dir)
            return uvloop.run(stack.run_dev(settings, host, port, data_dir, known, servers))
        finally:
            # A second Ctrl-C must not cut the shutdown short and leave servers running.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if postgres is not None:
                postgres.stop()


if __name__ == "__main__":
    sys.exit(main())
