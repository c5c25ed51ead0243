"""A throwaway PostgreSQL for development, tests and benchmarks, unless ``DATABASE_URL`` names one.

It comes from the ``pgserver`` wheel, so ``pip install`` is the only setup step (distribution packages
differ from machine to machine), else from the machine's own ``initdb``/``pg_ctl``. Each instance keeps
its own data directory and binds to nothing public."""

from __future__ import annotations

import logging
import os
import pwd
import re
import stat
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

from controlplane.embedded import EmbeddedService, free_port, log_tail

log = logging.getLogger(__name__)


def database_url_from_env() -> str | None:
    """``DATABASE_URL`` when set and non-empty: an existing database wins over starting one."""
    return os.environ.get("DATABASE_URL") or None


class EmbeddedPostgres(EmbeddedService):
    """A throwaway PostgreSQL under ``data_dir``, reachable only from this machine.

    Prefers the ``pgserver`` wheel (its own PostgreSQL build, unix socket only, so nothing listens on a
    port); falls back to the machine's ``initdb``/``pg_ctl`` on a free 127.0.0.1 port. Both trust every
    local connection, which is fine for a database that only tests and development use."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._dsn: str | None = None
        self._stop: Callable[[], None] | None = None

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise RuntimeError("PostgreSQL is not running; call start() first")
        return self._dsn

    def start(self) -> str:
        """Start the server and return an asyncpg-usable DSN."""
        if self._dsn is not None:
            raise RuntimeError("PostgreSQL is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_pgserver()
        except Exception as pgserver_error:
            bindir = _system_postgres_bindir()
            if bindir is None:
                raise RuntimeError(
                    f"could not start PostgreSQL: the pgserver wheel failed ({pgserver_error!r}) and "
                    "there is no initdb/pg_ctl under /usr/lib/postgresql/*/bin. Install pgserver "
                    "(pip install pgserver), install the PostgreSQL server binaries (e.g. apt-get install "
                    "postgresql), or set DATABASE_URL to an existing database."
                ) from pgserver_error
            log.warning("pgserver failed (%r); using the system PostgreSQL in %s", pgserver_error, bindir)
            self._start_system(bindir)
        return self.dsn

    def stop(self) -> None:
        if self._stop is None:
            return
        self._stop()
        self._stop = None
        self._dsn = None

    def _start_pgserver(self) -> None:
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes with the
        # fallback, so the warning is only noise.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import pgserver

            server = pgserver.get_server(self.data_dir / "pgserver", cleanup_mode="stop")
        self._dsn = server.get_uri()
        self._stop = server.cleanup

    def _start_system(self, bindir: Path) -> None:
        pgdata = self.data_dir / "pgdata"
        pgdata.mkdir(exist_ok=True)
        as_owner = _run_as_postgres_owner(pgdata)
        if not (pgdata / "PG_VERSION").exists():
            initdb = [*as_owner, str(bindir / "initdb"), "-D", str(pgdata)]
            subprocess.run(
                [*initdb, "-U", "postgres", "-E", "UTF8", "--auth=trust"],
                cwd=pgdata,
                check=True,
                capture_output=True,
                timeout=120,
            )
        port = free_port()
        pg_ctl = [*as_owner, str(bindir / "pg_ctl"), "-D", str(pgdata)]
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
        try:
            subprocess.run(
                [*pg_ctl, "-w", "-t", "60", "-l", str(pgdata / "postgres.log"), "-o", options, "start"],
                cwd=pgdata,
                check=True,
                capture_output=True,
                timeout=90,
            )
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"pg_ctl start failed: {err.stderr.decode(errors='replace').strip()}; last lines of "
                f"{pgdata / 'postgres.log'}:\n{log_tail(pgdata / 'postgres.log')}"
            ) from err

        def stop() -> None:
            subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], cwd=pgdata, check=True, capture_output=True)

        self._dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._stop = stop


def _system_postgres_bindir() -> Path | None:
    """The newest Debian-style PostgreSQL installation with the tools to run a private cluster."""
    found = [
        bindir
        for bindir in Path("/usr/lib/postgresql").glob("*/bin")
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()
    ]
    return max(found, key=_major_minor, default=None)


def _major_minor(bindir: Path) -> list[int]:
    """``/usr/lib/postgresql/9.6/bin`` -> ``[9, 6]``, so ``16`` sorts above ``9.6``."""
    return [int(number) for number in re.findall(r"\d+", bindir.parent.name)]


def _run_as_postgres_owner(pgdata: Path) -> list[str]:
    """PostgreSQL refuses to run as root. Under root, hand ``pgdata`` to the ``postgres`` user, let it
    traverse the parent directories, and return the ``runuser`` prefix for the commands."""
    if os.geteuid() != 0:
        return []
    owner = pwd.getpwnam("postgres")
    os.chown(pgdata, owner.pw_uid, owner.pw_gid)
    for parent in pgdata.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
    return ["runuser", "-u", "postgres", "--"]
