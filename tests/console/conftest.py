"""Browser tests of the console: a real ``controlplane dev`` stack in a subprocess and headless Chromium.

Fixtures (all test functions here are plain, synchronous functions):
- ``dev_stack`` (package scope): ``python -m controlplane dev`` on a free port with a data dir of its
  own and a fresh database on the suite's PostgreSQL; yields a ``DevStack`` once ``dev.json`` exists and
  ``/readyz`` answers 200. Stopped by PID at the end of tests/console, with every process it started.
- ``browser`` (package scope): Chromium through Playwright's sync API, from ``$CP_CHROMIUM`` or
  ``/usr/bin/chromium`` (``make test`` installs it, see scripts/ensure-chromium.sh).
- ``page``: a fresh browser context and page per test, closed afterwards; a failing test leaves a
  screenshot in tests/artifacts/console/<test>-failed.png.
- ``screenshot(page, name)``: saves tests/artifacts/console/<name>.png.

Why the sync API, and why package scope rather than session scope: the sync API drives Playwright's
own event loop from a greenlet, and between two sync calls it leaves that loop marked as the thread's
running loop (playwright/_impl/_greenlets.py, ``wait_for_future``). While the Playwright driver is up,
pytest-asyncio can therefore run no coroutine on this thread: every async test or async fixture fails
with "Runner.run() cannot be called from a running event loop" (checked with pytest-asyncio 1.x and
Playwright 1.65: a session-scoped sync browser broke every async test that ran after it). Scoped to
the package, the driver stops before the rest of the suite runs, which then works unchanged. Inside
tests/console, use no async tests and no async fixtures (``httpx.Client``, not ``AsyncClient``); the
``dev_stack`` fixture does its one asyncpg call on a worker thread for that reason. The async API
would avoid this but make every console test a coroutine on the suite's loop; the sync API reads
better and works reliably under these rules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from core.embedded import free_port
from core.ids import new_id
from tests.gateway.conftest import _with_database

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parent / "artifacts" / "console"
"""Screenshots (gitignored)."""

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--no-proxy-server",  # the stack is on 127.0.0.1: an http_proxy in the environment must not get in between
]
READY_WITHIN = 90.0
"""Seconds ``controlplane dev`` gets to write dev.json and answer /readyz."""

T = TypeVar("T")


# --- Marks and rules ---------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in tests/console is a ``browser`` and ``integration`` test."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _console_tests_are_sync(request: pytest.FixtureRequest) -> None:
    """Say why an async test cannot work here, instead of pytest-asyncio's puzzling RuntimeError."""
    if inspect.iscoroutinefunction(request.function):
        pytest.fail(
            "tests/console tests must be plain (sync) functions: Playwright's sync API marks its own event loop "
            "as running while the browser is up, so pytest-asyncio cannot run coroutines (see conftest.py)"
        )


# --- The dev stack -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevStack:
    gateway_url: str
    info: dict[str, Any]
    """dev.json, parsed: gateway_url, nats_url, database_url, orgs."""
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    """stdout and stderr of ``controlplane dev``; the projector and runner log to data_dir/*.log."""

    @property
    def orgs(self) -> dict[str, dict[str, str]]:
        """org -> role -> API key (acme and globex; admin, submitter, worker, approver, viewer)."""
        orgs: dict[str, dict[str, str]] = self.info["orgs"]
        return orgs

    def key(self, org: str = "acme", role: str = "admin") -> str:
        return self.orgs[org][role]

    def client(self, org: str = "acme", role: str = "admin") -> httpx.Client:
        """A sync client of the API with that org's key for that role (close it, or use ``with``)."""
        return httpx.Client(
            base_url=self.gateway_url,
            headers={"Authorization": f"Bearer {self.key(org, role)}"},
            timeout=20,
            trust_env=False,
        )

    def logs(self) -> str:
        """The last lines of every log of the stack, for assertion messages."""
        parts = [f"--- {self.log_path.name}\n{_tail(self.log_path)}"]
        parts += [f"--- {path.name}\n{_tail(path)}" for path in sorted(self.data_dir.glob("*.log"))]
        return "\n".join(parts)


@pytest.fixture(scope="package")
def dev_stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[DevStack]:
    """``controlplane dev`` in a subprocess, on a free port, a data dir of its own and a fresh database on
    the suite's PostgreSQL (``DATABASE_URL`` when set, else the session's throwaway server). One stack for
    all of tests/console: tests see each other's tasks and approvals, so look for the ids you created."""
    root = tmp_path_factory.mktemp("console-dev")
    data_dir, log_path = root / "data", root / "dev.log"
    port = free_port()
    database = f"console_{new_id()[-12:]}"
    _in_thread(_execute(database_url, f'CREATE DATABASE "{database}"'))
    # Without provider keys (OPENAI_API_KEY, ...) the example workflows answer through LiteLLM's mock_response:
    # tests never reach a model over the network.
    env = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
    env |= {"DATABASE_URL": _with_database(database_url, database), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "controlplane", "dev", "--port", str(port), "--data-dir", str(data_dir)]
    try:
        started = time.monotonic()
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C at the terminal is for pytest; we stop the stack ourselves
            )
        started_processes: set[_Proc] = set()
        try:
            stack = _wait_until_ready(process, data_dir, log_path)
            started_processes |= _started_by(process.pid, data_dir)
            print(f"\ncontrolplane dev ready in {time.monotonic() - started:.1f} s at {stack.gateway_url}", flush=True)
            yield stack
        finally:
            started_processes |= _started_by(process.pid, data_dir)
            _stop(process, started_processes, log_path)
    finally:
        _in_thread(_execute(database_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


def _wait_until_ready(process: subprocess.Popen[bytes], data_dir: Path, log_path: Path) -> DevStack:
    info_path = data_dir / "dev.json"
    deadline = time.monotonic() + READY_WITHIN
    last = "no dev.json yet"
    with httpx.Client(timeout=2, trust_env=False) as http:
        while True:
            if process.poll() is not None:
                pytest.fail(f"controlplane dev exited with {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"controlplane dev not ready in {READY_WITHIN:.0f} s ({last}):\n{_tail(log_path)}")
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text())
                    response = http.get(f"{info['gateway_url']}/readyz")
                    if response.status_code == 200:
                        return DevStack(info["gateway_url"], info, data_dir, process, log_path)
                    last = f"/readyz answered {response.status_code}: {response.text[:200]}"
                except (ValueError, httpx.HTTPError) as exc:  # dev.json half-written, or not listening yet
                    last = repr(exc)
            time.sleep(0.2)


# --- Processes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
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


def _started_by(root: int, data_dir: Path) -> set[_Proc]:
    """Every live descendant of ``root`` (the nats-server, the projector and the runner are its
    children), and any process that names ``data_dir`` on its command line (an embedded PostgreSQL
    is a daemon whose parent is init)."""
    children: dict[int, list[int]] = {}
    procs: dict[int, _Proc] = {}
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
        procs[pid] = _Proc(pid, stat[1])
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


def _stop(process: subprocess.Popen[bytes], started: set[_Proc], log_path: Path) -> None:
    """SIGTERM (the stack stops its children in order), a grace period, then SIGKILL; then whatever it
    left behind, the same way."""
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
        f"stopped them:\n{_tail(log_path)}",
        stacklevel=1,
    )


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log written)"


# --- asyncpg off the test thread -----------------------------------------------------------------------


async def _execute(database_url: str, sql: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a thread of its own: this thread may have Playwright's loop
    marked as running (see the module docstring), and asyncio.run here would also unset the suite's loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


# --- The browser -------------------------------------------------------------------------------------


def chromium_path() -> str:
    return os.environ.get("CP_CHROMIUM") or DEFAULT_CHROMIUM


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Headless Chromium (never Playwright's own download), shared by the tests of tests/console."""
    executable = chromium_path()
    if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        pytest.fail(
            f"no Chromium at {executable}: run `make chromium` (apt-get install chromium as root), "
            "`sudo apt-get install chromium`, or set CP_CHROMIUM to a Chromium binary"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so ``page`` knows at teardown whether the test failed."""
    report = yield
    setattr(item, f"_console_report_{report.when}", report)
    return report


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A new context (own cookies and storage, so sessions never leak between tests) and a page in it."""
    context = browser.new_context()
    opened = context.new_page()
    try:
        yield opened
        report = getattr(request.node, "_console_report_call", None)
        if report is not None and report.failed and not opened.is_closed():
            try:
                screenshot(opened, f"{request.node.name}-failed")
            except PlaywrightError as exc:  # a crashed page: the test's own failure is what matters
                warnings.warn(f"no failure screenshot of {request.node.name}: {exc}", stacklevel=1)
    finally:
        context.close()


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as tests/artifacts/console/<name>.png and return the path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}.png"
    page.screenshot(path=path, full_page=True)
    return path
