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

import inspect
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from controlplane.devstack import (
    CHROMIUM_ARGS,
    DevStackNotReady,
    RunningDevStack,
    chromium_path,
    fresh_database,
    running_dev_stack,
)

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parent / "artifacts" / "console"
"""Screenshots (gitignored)."""


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
    running: RunningDevStack

    @property
    def gateway_url(self) -> str:
        return self.running.gateway_url

    @property
    def info(self) -> dict[str, Any]:
        """dev.json, parsed: gateway_url, nats_url, database_url, orgs."""
        return self.running.info

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
        return self.running.logs()


@pytest.fixture(scope="package")
def dev_stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[DevStack]:
    """``controlplane dev`` in a subprocess (controlplane/devstack.py), on a free port, a data dir of its
    own and a fresh database on the suite's PostgreSQL (``DATABASE_URL`` when set, else the session's
    throwaway server). One stack for all of tests/console: tests see each other's tasks and approvals,
    so look for the ids you created."""
    root = tmp_path_factory.mktemp("console-dev")
    # Without provider keys (OPENAI_API_KEY, ...) the example workflows answer through LiteLLM's mock_response:
    # tests never reach a model over the network.
    env = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
    started = time.monotonic()
    with fresh_database(database_url, prefix="console") as database:
        try:
            with running_dev_stack(root / "data", root / "dev.log", env={**env, "DATABASE_URL": database}) as running:
                print(f"\ncontrolplane dev ready in {time.monotonic() - started:.1f} s at {running.gateway_url}")
                yield DevStack(running)
        except DevStackNotReady as exc:
            pytest.fail(str(exc))


# --- The browser -------------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Headless Chromium (never Playwright's own download), shared by the tests of tests/console."""
    try:
        executable = chromium_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
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
