"""``controlplane dev`` as a child process, for benchmarks and browser tests: start it on a free port
with a data dir of its own, wait until ``dev.json`` exists and ``/readyz`` answers 200, and at the end
stop it together with every process it started (by PID, never by name).

    with fresh_database(server_url) as database_url:  # only when DATABASE_URL names a server to use
        with running_dev_stack(data_dir, log_path, env={**os.environ, "DATABASE_URL": database_url}) as stack:
            ...  # stack.gateway_url, stack.info["orgs"]["acme"]["approver"], ...

The stack's children are the nats-server, the projector and the runner; an embedded PostgreSQL is a
daemon whose parent is init, found because its command line names the data dir. ``controlplane dev``
runs in a session of its own, so a Ctrl-C at the terminal reaches only the caller, whose ``with``
block then stops the stack.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from controlplane.embedded import free_port

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--no-proxy-server",  # everything is on 127.0.0.1: an http_proxy in the environment must not get in between
]
"""Headless Chromium on a machine without a network or a GPU: Debian's, never a browser download."""
READY_WITHIN = 90.0
"""Seconds ``controlplane dev`` gets to write dev.json and answer /readyz."""


def chromium_path() -> str:
    """``$CP_CHROMIUM``, else Debian's Chromium; raises ``FileNotFoundError`` saying how to get one."""
    path = os.environ.get("CP_CHROMIUM") or "/usr/bin/chromium"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise FileNotFoundError(
            f"no Chromium at {path}: run `make chromium` (apt-get install chromium as root), "
            "`sudo apt-get install chromium`, or set CP_CHROMIUM to a Chromium binary"
        )
    return path


class DevStackNotReady(RuntimeError):
    """``controlplane dev`` exited, or was not ready in time; the message ends with its log."""


@dataclass(frozen=True)
class RunningDevStack:
    info: dict[str, Any]
    """dev.json, parsed: gateway_url, nats_url, database_url, orgs (org -> role -> API key)."""
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    """stdout and stderr of ``controlplane dev``; the projector and runner log to data_dir/*.log."""

    @property
    def gateway_url(self) -> str:
        url: str = self.info["gateway_url"]
        return url

    def logs(self) -> str:
        """The last lines of every log of the stack, for error messages."""
        parts = [f"--- {self.log_path.name}\n{tail(self.log_path)}"]
        parts += [f"--- {path.name}\n{tail(path)}" for path in sorted(self.data_dir.glob("*.log"))]
        return "\n".join(parts)


@contextlib.contextmanager
def running_dev_stack(
    data_dir: Path,
    log_path: Path,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    ready_within: float = READY_WITHIN,
) -> Iterator[RunningDevStack]:
    """``python -m controlplane dev`` on 127.0.0.1 (a free port unless given), ready when yielded; stopped
    with everything it started when the block ends, however it ends. Raises ``DevStackNotReady``."""
    port = port or free_port()
    command = [sys.executable, "-m", "controlplane", "dev", "--port", str(port), "--data-dir", str(data_dir)]
    environment = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # a Ctrl-C at the terminal is for the caller; we stop the stack ourselves
        )
    started: set[Proc] = set()
    try:
        stack = _wait_until_ready(process, data_dir, log_path, ready_within)
        started |= started_by(process.pid, data_dir)
        yield stack
    finally:
        started |= started_by(process.pid, data_dir)
        stop(process, started, log_path)


def _wait_until_ready(
    process: subprocess.Popen[bytes], data_dir: Path, log_path: Path, within: float
) -> RunningDevStack:
    info_path = data_dir / "dev.json"
    deadline = time.monotonic() + within
    last = "no dev.json yet"
    with httpx.Client(timeout=2, trust_env=False) as http:
        while True:
            if process.poll() is not None:
                raise DevStackNotReady(f"controlplane dev exited with {process.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise DevStackNotReady(f"controlplane dev not ready in {within:.0f} s ({last}):\n{tail(log_path)}")
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text())
                    response = http.get(f"{info['gateway_url']}/readyz")
                    if response.status_code == 200:
                        return RunningDevStack(info, data_dir, process, log_path)
                    last = f"/readyz answered {response.status_code}: {response.text[:200]}"
                except (ValueError, httpx.HTTPError) as exc:  # dev.json half-written, or not listening yet
                    last = repr(exc)
            time.sleep(0.2)


# --- Processes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """A process by PID and start time, so a PID the kernel reuses later is never mistaken for it."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start_time and stat[2] != "Z"


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def started_by(root: int, data_dir: Path) -> set[Proc]:
    """Every live descendant of ``root`` (the nats-server, the projector and the runner are its
    children), and any process that names ``data_dir`` on its command line (an embedded PostgreSQL
    is a daemon whose parent is init)."""
    children: dict[int, list[int]] = {}
    procs: dict[int, Proc] = {}
    marker = str(data_dir).encode()
    named: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None:
            continue
        children.setdefault(stat[0], []).append(pid)
        procs[pid] = Proc(pid, stat[1])
        try:
            if marker in (entry / "cmdline").read_bytes():
                named.add(pid)
        except OSError:
            continue
    found: set[int] = set()
    todo = [root, *named]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    found.discard(root)
    return {procs[pid] for pid in found if pid in procs and pid != os.getpid()}


def stop(process: subprocess.Popen[bytes], started: set[Proc], log_path: Path) -> None:
    """SIGTERM (the stack stops its children in order), a grace period, then SIGKILL; then whatever it
    left behind, the same way, with a warning that names them."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    left = [proc for proc in started if proc.alive()]
    if not left:
        return
    for proc in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(proc.alive() for proc in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in left:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    warnings.warn(
        f"controlplane dev (exit {process.returncode}) left processes {sorted(p.pid for p in left)} running; "
        f"stopped them:\n{tail(log_path)}",
        stacklevel=2,
    )


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log written)"


# --- A database of its own -----------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "devstack") -> Iterator[str]:
    """A new, empty database on the PostgreSQL server of ``server_url`` (whose own database is only used
    to create and drop it); yields its URL and drops it at the end. A stack started on a fresh NATS data
    dir needs a fresh database: read models and checkpoints of another log would not match it."""
    database = f"{prefix}_{secrets.token_hex(6)}"
    _execute(server_url, f'CREATE DATABASE "{database}"')
    try:
        yield with_database(server_url, database)
    finally:
        _execute(server_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def with_database(dsn: str, database: str) -> str:
    """The same server, another database: swap the path of the DSN."""
    scheme, rest = dsn.split("://", 1)
    authority, _, rest = rest.partition("/")
    _, query_sep, query = rest.partition("?")
    return f"{scheme}://{authority}/{database}{query_sep}{query}"


def _execute(database_url: str, sql: str) -> None:
    """One statement, on a thread of its own: the caller's thread may have an event loop marked as
    running (Playwright's sync API does that), where ``asyncio.run`` cannot be used."""

    async def execute() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, execute()).result()
