"""The operator console under load: with 1,000 tasks and 200 pending approvals in the org, how long
the approvals inbox and the page of a run with 200 events take to load, and how long after an
``ApprovalRequested`` the new row appears in an open inbox.

Starts its own stack (``controlplane dev`` in a subprocess on 127.0.0.1, a temporary data dir; on the
PostgreSQL of ``DATABASE_URL`` in a fresh database when that is set, else an embedded one) and stops it
with everything it started at the end, also on Ctrl-C or an error. Seeds org acme over HTTP on a queue
of its own (``bench-console``, no workflow: the dev runner never takes these tasks):

- ``--tasks`` tasks; ``--approvals`` of them claimed by a bench worker and put into
  ``awaiting_approval`` with a plan and a diff as details; one more driven to ``--events`` events
  (claim, heartbeats, complete) for the run page.
- Page loads, signed in as acme's approver: ``--loads`` sequential GETs of ``/console/approvals`` and
  of ``/console/tasks/{id}`` with httpx (request sent to the whole HTML body read), then
  ``BROWSER_LOADS`` loads of each in headless Chromium (``page.goto`` until the load event).
- Live appearance, ``--live`` times one after another: a bench worker claims a fresh task and asks for
  approval; from the moment that POST returned (``ApprovalRequested`` is in the log) until a
  MutationObserver in the open inbox sees the row (both clocks are this machine's epoch clock).

Targets (the issue): page loads p99 <= 150 ms; live appearance p99 <= 1 s.

    .venv/bin/python bench/console.py [--tasks 1000] [--approvals 200] [--events 200] [--loads 200]
                                      [--live 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
from lifecycle import pct
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeout

from controlplane.devstack import CHROMIUM_ARGS, chromium_path, fresh_database, running_dev_stack
from controlplane.embedded_postgres import database_url_from_env

QUEUE = "bench-console"
WORKER = "bench-console-worker"
CONCURRENCY = 16
BROWSER_LOADS = 30
WARMUP = 5
"""Untimed page loads (and live appearances: 2) before the timed ones: templates compiled, connections open."""
LIVE_WARMUP = 2
APPEAR_WITHIN_MS = 15_000
CLOSE_WITHIN = 10.0
PAGE_LOAD_TARGET_MS = 150.0
LIVE_TARGET_MS = 1000.0
PLAN = [
    "1. Scale the payments deployment from 4 to 6 replicas",
    "2. Roll out image payments:2026.12.1 with maxUnavailable=1",
    "3. Watch the error rate for 10 minutes; roll back above 1%",
    "4. Post the outcome to #ops",
]
DIFF = """--- a/deploy/payments.yaml
+++ b/deploy/payments.yaml
@@ -12,9 +12,9 @@ spec:
-  replicas: 4
+  replicas: 6
   template:
     spec:
       containers:
-        - image: registry.internal/payments:2026.11.4
+        - image: registry.internal/payments:2026.12.1
           resources:
-            limits: {cpu: "1", memory: 1Gi}
+            limits: {cpu: "2", memory: 2Gi}
"""
OBSERVE_ROWS = """() => {
  // Record, per approval id, when its inbox row first appeared (epoch ms, the same clock as Python's time.time()).
  window.__cpSeen = {};
  performance.setResourceTimingBufferSize(100000);
  const note = (element, now) => {
    const id = element.getAttribute("data-approval-id");
    if (id && !(id in window.__cpSeen)) window.__cpSeen[id] = now;
  };
  const rows = '[data-testid="approval-row"]';
  document.querySelectorAll(rows).forEach((element) => note(element, 0));  // already there: not timed
  new MutationObserver((records) => {
    const now = Date.now();
    for (const record of records) {
      for (const node of record.addedNodes) {
        if (node.nodeType !== Node.ELEMENT_NODE) continue;
        if (node.matches(rows)) note(node, now);
        node.querySelectorAll(rows).forEach((element) => note(element, now));
      }
    }
  }).observe(document.body, { childList: true, subtree: true });
}"""
ROW_FETCH = """(id) => {
  // The live feed's fetch of the row (epoch ms): when the page asked for it, and when the answer was in.
  const entry = performance.getEntriesByType("resource").find((e) => e.name.includes(`/console/approvals/${id}/row`));
  return entry ? [performance.timeOrigin + entry.startTime, performance.timeOrigin + entry.responseEnd] : null;
}"""
NAVIGATION = """() => {
  // The page's own navigation timing, ms from the start of the navigation.
  const n = performance.getEntriesByType("navigation")[0];
  return {
    body: n.responseEnd - n.startTime,
    ready: n.domContentLoadedEventEnd - n.startTime,
    load: n.loadEventEnd - n.startTime,
    elements: document.getElementsByTagName("*").length,
  };
}"""

T = TypeVar("T")


def summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": pct(samples, 0.50), "p99": pct(samples, 0.99), "max": max(samples, default=0.0)}


async def bounded(jobs: Iterable[Callable[[], Awaitable[T]]], concurrency: int = CONCURRENCY) -> list[T]:
    """Run the jobs with at most ``concurrency`` at once; results in the jobs' order."""
    slots = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


def ok(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}"
        )
    return response.json() if response.content else {}


class ConsoleBench:
    def __init__(self, url: str, keys: dict[str, str], args: argparse.Namespace) -> None:
        self.url, self.keys, self.args = url, keys, args
        self.last_seq = 0
        self.run_task_id = ""
        self.setup: dict[str, Any] = {}

    def client(self, role: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.keys[role]}"},
            timeout=30,
            trust_env=False,
            limits=httpx.Limits(max_connections=CONCURRENCY),
        )

    def saw(self, document: dict[str, Any]) -> dict[str, Any]:
        self.last_seq = max(self.last_seq, int(document.get("seq") or 0))
        return document

    # --- Seeding -------------------------------------------------------------------------------------

    async def seed(self) -> None:
        started = time.perf_counter()
        async with self.client("submitter") as submitter, self.client("worker") as worker:
            self.saw(ok(await worker.post("/v1/workers", json={"worker_id": WORKER, "queue": QUEUE})))

            async def submit(i: int) -> dict[str, Any]:
                body = {"type": "deploy", "queue": QUEUE, "payload": {"n": i, "service": "payments"}}
                return self.saw(ok(await submitter.post("/v1/tasks", json=body)))

            await bounded([functools.partial(submit, i) for i in range(self.args.tasks)])
            submitted = time.perf_counter()
            self.run_task_id = await self.drive_to_events(worker, self.args.events)
            await bounded([lambda: self.request_approval(worker) for _ in range(self.args.approvals)])
            requested = time.perf_counter()
        async with self.client("approver") as approver:
            pending = await self.pending_approvals(approver)
        if pending < self.args.approvals:
            raise RuntimeError(f"{pending} pending approvals in the read model, expected {self.args.approvals}")
        self.setup |= {
            "tasks": self.args.tasks,
            "pending_approvals": pending,
            "run_task_id": self.run_task_id,
            "submit_seconds": submitted - started,
            "seed_seconds": requested - started,
            "read_model_caught_up_seconds": time.perf_counter() - requested,
        }

    async def claim(self, worker: httpx.AsyncClient, lease_seconds: int = 60) -> tuple[str, str]:
        body = {"worker_id": WORKER, "queue": QUEUE, "lease_seconds": lease_seconds}
        response = await worker.post("/v1/tasks/claim", json=body)
        if response.status_code == 204:
            raise RuntimeError(f"no pending task left on {QUEUE}: raise --tasks")
        claimed = ok(response)
        self.saw(claimed["task"])
        return claimed["task"]["id"], claimed["lease"]["id"]

    async def request_approval(self, worker: httpx.AsyncClient) -> str:
        """Claim a fresh task and ask for approval; the approval's id."""
        task_id, lease_id = await self.claim(worker)
        body = {
            "worker_id": WORKER,
            "lease_id": lease_id,
            "reason": "deploy payments 2026.12.1 to production",
            "details": {"plan": PLAN, "diff": DIFF, "tool": "kubectl apply -f deploy/payments.yaml"},
        }
        approval = self.saw(ok(await worker.post(f"/v1/tasks/{task_id}/approval-requests", json=body)))
        approval_id: str = approval["id"]
        return approval_id

    async def drive_to_events(self, worker: httpx.AsyncClient, events: int) -> str:
        """Claim a task, heartbeat it, complete it: TaskSubmitted + TaskClaimed + heartbeats + TaskCompleted."""
        task_id, lease_id = await self.claim(worker, lease_seconds=600)
        lease = {"worker_id": WORKER, "lease_id": lease_id}
        for beat in range(max(0, events - 3)):
            body = {**lease, "progress": {"step": beat, "note": f"applied {beat} of {events - 3} manifests"}}
            self.saw(ok(await worker.post(f"/v1/tasks/{task_id}/heartbeat", json=body)))
        result = {"replicas": 6, "image": "registry.internal/payments:2026.12.1", "rolled_back": False}
        self.saw(ok(await worker.post(f"/v1/tasks/{task_id}/complete", json={**lease, "result": result})))
        return task_id

    async def pending_approvals(self, approver: httpx.AsyncClient) -> int:
        """Pending approvals of the org once the read models (approvals, and the tasks the inbox shows with
        them) have projected everything seeded so far."""
        for _ in range(100):  # each answer waits up to the gateway's read wait, then says 503
            if (await approver.get("/v1/tasks", params={"limit": 1, "min_seq": self.last_seq})).status_code != 503:
                break
        count, cursor = 0, None
        while True:
            params: dict[str, Any] = {"status": "pending", "limit": 500, "min_seq": self.last_seq}
            if cursor:
                params["cursor"] = cursor
            response = await approver.get("/v1/approvals", params=params)
            if response.status_code == 503:  # not projected that far yet
                await asyncio.sleep(0.2)
                continue
            page = ok(response)
            count += len(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return count

    # --- Page loads ----------------------------------------------------------------------------------

    async def sign_in(self, context: BrowserContext) -> str:
        """Sign in as acme's approver as a person does; the session cookie's value."""
        page = await context.new_page()
        await page.goto(f"{self.url}/console")
        await page.get_by_test_id("signin-key").fill(self.keys["approver"])
        await page.get_by_test_id("signin-submit").click()
        await page.wait_for_url(f"{self.url}/console/approvals")
        await page.close()
        session = next((c["value"] for c in await context.cookies() if c["name"] == "cp_session"), None)
        if not session:
            raise RuntimeError("signing in set no cp_session cookie")
        return session

    async def http_loads(self, session: str, paths: dict[str, str]) -> dict[str, dict[str, float]]:
        """``--loads`` sequential GETs of each page, interleaved, each timed from sending the request to
        having read the whole body."""
        samples: dict[str, list[float]] = {name: [] for name in paths}
        async with httpx.AsyncClient(base_url=self.url, cookies={"cp_session": session}, trust_env=False) as http:
            for name, path in paths.items():
                body = await self.get_page(http, path)
                self.setup[f"{name}_page_bytes"] = len(body)
                self.setup[f"{name}_page_rows"] = len(
                    re.findall(r'data-testid="(?:approval-row|timeline-event)"', body)
                )
            for round_ in range(WARMUP + self.args.loads):
                for name, path in paths.items():
                    started = time.perf_counter()
                    await self.get_page(http, path)
                    if round_ >= WARMUP:
                        samples[name].append((time.perf_counter() - started) * 1000)
        return {name: summary(values) for name, values in samples.items()}

    @staticmethod
    async def get_page(http: httpx.AsyncClient, path: str) -> str:
        response = await http.get(path)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
        return response.text

    async def browser_loads(self, context: BrowserContext, paths: dict[str, str]) -> dict[str, dict[str, float]]:
        """Headless Chromium: ``page.goto`` until the load event, per page, interleaved; also the page's
        own navigation timing (time to the last byte of the HTML, and to the end of the load event)."""
        samples: dict[str, list[float]] = {}
        page = await context.new_page()
        for round_ in range(WARMUP + BROWSER_LOADS):
            for name, path in paths.items():
                started = time.perf_counter()
                await page.goto(f"{self.url}{path}", wait_until="load")
                elapsed = (time.perf_counter() - started) * 1000
                timing = await page.evaluate(NAVIGATION)
                if round_ >= WARMUP:
                    samples.setdefault(f"{name} goto->load", []).append(elapsed)
                    samples.setdefault(f"{name} nav: html body read", []).append(timing["body"])
                    samples.setdefault(f"{name} nav: DOMContentLoaded done", []).append(timing["ready"])
                    samples.setdefault(f"{name} nav: load event done", []).append(timing["load"])
                self.setup[f"{name}_page_elements"] = timing["elements"]
        await page.close()
        return {name: summary(values) for name, values in samples.items()}

    # --- Live appearance -----------------------------------------------------------------------------

    async def live(self, context: BrowserContext) -> dict[str, dict[str, float]]:
        page = await context.new_page()
        await page.goto(f"{self.url}/console/approvals", wait_until="load")
        await page.evaluate(OBSERVE_ROWS)
        latency: list[float] = []
        to_fetch: list[float] = []
        fetching: list[float] = []
        to_insert: list[float] = []
        async with self.client("worker") as worker:
            for sample in range(LIVE_WARMUP + self.args.live):
                approval_id = await self.request_approval(worker)
                returned = time.time() * 1000
                seen = await self.appeared(page, approval_id)
                if sample < LIVE_WARMUP:
                    continue
                latency.append(seen - returned)
                fetch = await page.evaluate(ROW_FETCH, approval_id)
                if fetch is not None:
                    to_fetch.append(fetch[0] - returned)
                    fetching.append(fetch[1] - fetch[0])
                    to_insert.append(seen - fetch[1])
        await page.close()
        return {
            "POST returned -> row in the DOM": summary(latency),
            "part: POST returned -> row fetch sent": summary(to_fetch),
            "part: row fetch (GET .../row)": summary(fetching),
            "part: row fetched -> in the DOM": summary(to_insert),
        }

    @staticmethod
    async def appeared(page: Page, approval_id: str) -> float:
        try:
            handle = await page.wait_for_function(
                "(id) => window.__cpSeen[id]", arg=approval_id, polling=5, timeout=APPEAR_WITHIN_MS
            )
        except PlaywrightTimeout as exc:
            raise RuntimeError(f"approval {approval_id} did not appear in the inbox in {APPEAR_WITHIN_MS} ms") from exc
        seen: float = await handle.json_value()
        return seen

    # --- All of it -----------------------------------------------------------------------------------

    async def run(self, chromium: str) -> dict[str, Any]:
        await self.seed()
        paths = {"inbox": "/console/approvals", "run": f"/console/tasks/{self.run_task_id}"}
        async with async_playwright() as playwright:
            browser: Browser = await playwright.chromium.launch(
                executable_path=chromium, headless=True, args=CHROMIUM_ARGS
            )
            try:
                context = await browser.new_context()
                session = await self.sign_in(context)
                http = await self.http_loads(session, paths)
                in_browser = await self.browser_loads(context, paths)
                live = await self.live(context)
            finally:
                # Pages are left to this close. Bounded: after a navigation cut short by Ctrl-C, Playwright's
                # close can wait forever; leaving async_playwright stops the driver, and Chromium with it.
                with contextlib.suppress(TimeoutError, PlaywrightError):
                    async with asyncio.timeout(CLOSE_WITHIN):
                        await browser.close()
        return {"setup": self.setup, "http": http, "browser": in_browser, "live": live}


# --- Report ------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    def run(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""

    model = next((line.split(":", 1)[1].strip() for line in run("lscpu").splitlines() if "Model name" in line), "?")
    memory = next((line.split()[1] for line in run("free", "-g").splitlines() if line.startswith("Mem:")), "?")
    return {
        "cpus": run("nproc").strip(),
        "cpu_model": model,
        "memory_gib": memory,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| measurement (ms) | n | p50 | p99 | max | target |", "|---|---|---|---|---|---|"]
    for group, target in (("http", PAGE_LOAD_TARGET_MS), ("browser", PAGE_LOAD_TARGET_MS), ("live", LIVE_TARGET_MS)):
        for name, s in result[group].items():
            verdict = ""
            if target is not None and not name.startswith("part:") and "nav:" not in name:
                verdict = f"p99 <= {target:.0f}: {'met' if s['p99'] <= target else 'NOT met'}"
            lines.append(
                f"| {group}: {name} | {s['n']} | {s['p50']:.1f} | {s['p99']:.1f} | {s['max']:.1f} | {verdict} |"
            )
    return "\n".join(lines)


def stop_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C: the ``with`` blocks stop the stack and drop its database."""

    def raise_interrupt(signum: int, frame: object) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--approvals", type=int, default=200, help="pending approvals in the inbox")
    parser.add_argument("--events", type=int, default=200, help="events of the task whose run page is loaded")
    parser.add_argument("--loads", type=int, default=200, help="timed HTTP loads of each page")
    parser.add_argument("--live", type=int, default=50, help="timed live appearances")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.tasks < args.approvals + 1 + LIVE_WARMUP + args.live:
        parser.error("--tasks must cover the approvals, the run page's task and the live samples")
    if args.events < 3:
        parser.error("--events must be at least 3 (submitted, claimed, completed)")
    try:
        chromium = chromium_path()
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    stop_on_sigterm()
    # Without provider keys the dev stack's example workflows never reach a model over the network.
    env = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        data_dir = Path(tmp) / "data"
        server_url = database_url_from_env()
        with fresh_database(server_url, "bench_console") if server_url else contextlib.nullcontext() as database_url:
            if database_url:
                env["DATABASE_URL"] = database_url
            with running_dev_stack(data_dir, Path(tmp) / "dev.log", env=env) as stack:
                bench = ConsoleBench(stack.gateway_url, stack.info["orgs"]["acme"], args)
                try:
                    result = asyncio.run(bench.run(chromium))
                except Exception:
                    print(stack.logs(), file=sys.stderr)
                    raise
    targets = {"page_load_p99_ms": PAGE_LOAD_TARGET_MS, "live_p99_ms": LIVE_TARGET_MS}
    facts = machine() | {"loadavg_1min_before": f"{load_before:.2f}", "loadavg_1min_after": f"{os.getloadavg()[0]:.2f}"}
    result = {"machine": facts, "options": vars(args), "targets": targets, **result}
    result["total_seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(result, indent=2))
        return
    setup = result["setup"]
    print(f"machine: {facts['cpus']} CPUs ({facts['cpu_model']}), {facts['memory_gib']} GiB, Python {facts['python']}")
    print(
        f"date: {facts['date']}; total {result['total_seconds']:.0f} s; load average (1 min) "
        f"{facts['loadavg_1min_before']} before, {facts['loadavg_1min_after']} after"
    )
    print(
        f"org acme: {setup['tasks']} tasks on {QUEUE}, {setup['pending_approvals']} pending approvals "
        f"(seeded in {setup['seed_seconds']:.1f} s; read model caught up {setup['read_model_caught_up_seconds']:.2f} s "
        f"later); inbox page {setup['inbox_page_bytes']:,} bytes, {setup['inbox_page_rows']} rows, "
        f"{setup['inbox_page_elements']:,} elements; run page {setup['run_page_bytes']:,} bytes, "
        f"{setup['run_page_rows']} timeline events, {setup['run_page_elements']:,} elements"
    )
    print(table(result))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the stack is stopped by then (the ``with`` blocks in main)
        print("interrupted; the stack it started is stopped", file=sys.stderr)
        sys.exit(130)
