"""``controlplane exec``: run one workflow task end to end from a terminal or a CI job, with a runner
in this very process. It submits the task on a queue of its own, hosts the workflow on that queue,
shows the task's events as they happen (an approval it waits for included, with where to decide it),
prints the result and exits 0 when the task completed, 1 when it did not. Nothing stays behind: the
runner stops, its worker is deregistered, and a task still open when the command gives up (Ctrl-C,
--timeout, a parked replay) is cancelled.

Events go to stderr and the result alone to stdout, so ``controlplane exec ... > result.json`` keeps
the result for a pipeline's next step while its log shows what happened; whatever else writes to
stdout meanwhile (workflow code, LiteLLM's logging) is sent to stderr."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import httpx
import uvloop

from controlplane.client import AsyncClient, Forbidden, NotFound, ProblemError, Unauthorized, Unavailable
from controlplane.connection import gateway_url_argument, key_arguments, key_from
from controlplane.exec_events import Follower, brief, say
from runners.client import TaskApi
from runners.registry import Registry, Workflow
from runners.runner import Runner

EXIT_COMPLETED, EXIT_NOT_COMPLETED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command stopped with Ctrl-C."""
CLAIM_BLOCK_MS = 1000
"""How long one claim waits for work: stopping the runner waits for the claim in flight to end."""
DRAIN_SECONDS = 15.0
"""How long the runner may take to finish what it runs once the command stops."""
KEY_ROLES_HINT = "exec both submits the task and works it: its key needs the admin role, or both submitter and worker"

_EXAMPLES = """\
examples:
  CP_API_KEY=$ADMIN_KEY controlplane exec --workflows runners.examples:EXAMPLES --workflow summarise \\
      --payload '{"text": "..."}' > result.json
  controlplane exec --workflows my_flows:ALL --workflow deploy --payload '{"env": "staging"}' --timeout 900

Exit status: 0 the task completed (its result is printed on stdout), 1 it failed, was cancelled, timed
out or was parked, 2 a usage error (arguments, workflows, a key without the roles), 3 the gateway cannot
be reached. Ctrl-C cancels the task and exits 130. The events are printed on stderr; an approval the
run waits for is printed with the console link and its id, and the run waits until someone decides it.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exec``; it sets ``run=fn(args) -> exit code`` as its default."""
    command = commands.add_parser(
        "exec",
        help="run one workflow task with an in-process runner, show its events, print its result",
        description="Submit one task of a workflow on a temporary queue, run it with a runner in this process, "
        "stream its events, print its result and exit 0 (completed) or 1 (not); then clean up. For CI "
        "pipelines and trying a workflow out.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--workflows", action="append", required=True, help="module:attr, repeatable")
    command.add_argument("--workflow", required=True, metavar="NAME", help="the workflow to run")
    command.add_argument("--version", type=int, help="its version (default: the newest --workflows hosts)")
    command.add_argument("--payload", default="{}", metavar="JSON", help="the task's payload (default: {})")
    command.add_argument(
        "--queue",
        help="submit on this queue (default: a fresh exec-<random> one); the in-process runner may then also "
        "take other tasks of the same workflows waiting there",
    )
    command.add_argument("--timeout", type=float, metavar="S", help="give up (cancel the task) after S seconds")
    command.add_argument(
        "--max-retries", type=int, default=0, help="retries of a failing workflow before the task fails (default: 0)"
    )
    command.add_argument("--lease-seconds", type=float, default=30.0)
    gateway_url_argument(command)
    key_arguments(command, "CP_API_KEY", "API key (admin, or submitter and worker)")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Argument problems raise ValueError, which the CLI reports with exit status 2."""
    key = key_from(args, os.environ, "CP_API_KEY")
    os.environ.pop("CP_API_KEY", None)  # not inherited by whatever the workflows start
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise ValueError(f"--payload is not JSON: {exc}") from None
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, not {args.timeout}")
    # As ``python -m`` would: a pipeline runs from its repository's root and names its modules from there.
    # Appended, not prepended, so a file in the directory never shadows an installed module.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        registry = Registry.load(args.workflows)
    except ImportError as exc:
        raise ValueError(f"cannot load --workflows: {exc}") from None
    chosen = registry.find(args.workflow, args.version)
    if chosen is None:
        hosted = ", ".join(item.removeprefix("workflow:") for item in registry.capabilities() if "@" in item)
        wanted = args.workflow if args.version is None else f"{args.workflow} v{args.version}"
        raise ValueError(f"--workflows hosts no workflow {wanted} (it hosts: {hosted or 'none'})")
    # The runner's own warnings repeat what the event lines already say, between them.
    logging.getLogger("runners").setLevel(logging.ERROR)
    logging.getLogger("controlplane.client").setLevel(logging.WARNING)
    logging.getLogger("LiteLLM").setLevel(logging.WARNING)  # a line per model call: the llm event says it
    plan = Plan(
        url=args.url.rstrip("/"),
        key=key,
        registry=registry,
        workflow=chosen,
        payload=payload,
        queue=args.queue or f"exec-{secrets.token_hex(4)}",
        worker_id=f"exec-{secrets.token_hex(4)}",
        timeout=args.timeout,
        max_retries=args.max_retries,
        lease_seconds=args.lease_seconds,
    )
    with _result_output() as result_output:
        return uvloop.run(execute(plan, result_output))


@contextlib.contextmanager
def _result_output() -> Iterator[TextIO]:
    """The result's own stdout, while whatever else writes to stdout (workflow code, LiteLLM's logging,
    a tool it starts) writes to stderr: a pipeline's ``> result.json`` then holds the result alone. At
    the descriptor level, so child processes inherit the redirection too."""
    sys.stdout.flush()
    original = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        with os.fdopen(os.dup(original), "w") as result_output:
            yield result_output
    finally:
        sys.stdout.flush()
        os.dup2(original, sys.stdout.fileno())
        os.close(original)


@dataclass(frozen=True)
class Plan:
    url: str
    key: str
    registry: Registry
    workflow: Workflow
    payload: Any
    queue: str
    worker_id: str
    timeout: float | None
    max_retries: int
    lease_seconds: float


async def execute(plan: Plan, result_output: TextIO) -> int:
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    if not await _reachable(plan.url):
        return EXIT_UNREACHABLE
    async with AsyncClient(plan.url, plan.key) as client:
        try:
            # Registering first checks the worker role before a task exists that nobody could run.
            await client.workers.register(plan.worker_id, plan.queue, plan.registry.capabilities())
        except (Forbidden, Unauthorized) as exc:
            say(f"controlplane exec: the key may not register a worker ({exc.detail}). {KEY_ROLES_HINT}")
            return EXIT_USAGE
        except (Unavailable, httpx.TransportError) as exc:
            say(f"controlplane exec: the gateway at {plan.url} does not answer ({exc}); check --url")
            return EXIT_UNREACHABLE
        say(f"runner {plan.worker_id} on queue {plan.queue} hosts {plan.workflow.name} v{plan.workflow.version}")
        api = TaskApi(plan.url, plan.key)
        stop = asyncio.Event()
        runner = Runner(
            api,
            plan.registry,
            worker_id=plan.worker_id,
            queue=plan.queue,
            concurrency=1,
            lease_seconds=plan.lease_seconds,
            block_ms=CLAIM_BLOCK_MS,
        )
        running = asyncio.create_task(runner.run(stop))
        try:
            return await _submit_and_follow(client, plan, running, interrupted, result_output)
        finally:
            await _stop_runner(stop, running)
            await api.close()
            await _deregister(plan)


async def _reachable(url: str) -> bool:
    """One quick look before the client's patient retries: a wrong --url fails in a second, not a minute."""
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            await http.get(f"{url}/healthz")
    except httpx.HTTPError as exc:
        say(f"controlplane exec: cannot reach the gateway at {url} ({exc!r}); check --url or $CP_GATEWAY_URL")
        return False
    return True


async def _submit_and_follow(
    client: AsyncClient, plan: Plan, running: asyncio.Task[None], interrupted: asyncio.Event, result_output: TextIO
) -> int:
    if interrupted.is_set():  # Ctrl-C while registering: nothing to cancel yet
        say("controlplane exec: interrupted before submitting")
        return EXIT_INTERRUPTED
    try:
        task = await client.submit(
            plan.workflow.name,
            plan.payload,
            queue=plan.queue,
            workflow={"name": plan.workflow.name, "version": plan.workflow.version},
            max_retries=plan.max_retries,
        )
    except Forbidden as exc:
        if exc.detail.startswith("this credential"):
            say(f"controlplane exec: the key may not submit ({exc.detail}). {KEY_ROLES_HINT}")
            return EXIT_USAGE
        say(f"controlplane exec: {exc.detail}")  # the submit policy said no: the run's outcome, not a usage error
        return EXIT_NOT_COMPLETED
    except ProblemError as exc:
        say(f"controlplane exec: the gateway refused the task: {exc}")
        return EXIT_USAGE if exc.status in (400, 401, 404, 413, 422) else EXIT_NOT_COMPLETED
    say(f"task {task.id}: {plan.workflow.name} v{plan.workflow.version} on queue {plan.queue}")
    follower = Follower(plan.url, task)
    following = asyncio.create_task(follower.follow(client))
    stopped = asyncio.create_task(interrupted.wait())
    try:
        done, _ = await asyncio.wait(
            {following, stopped, running}, timeout=plan.timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for job in (following, stopped):
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
    if following in done and following.exception() is None:
        return await _outcome(client, follower, result_output)
    if following in done:
        why = f"following the task's events failed: {following.exception()!r}"
        return await _give_up(client, task.id, why, EXIT_NOT_COMPLETED)
    if stopped in done:
        return await _give_up(client, task.id, "interrupted", EXIT_INTERRUPTED)
    if running in done:
        failure = running.exception() if not running.cancelled() else None
        why = f"the in-process runner stopped: {failure!r}"
        if isinstance(failure, RuntimeError) and " 403 " in str(failure):
            why += f". {KEY_ROLES_HINT}"
        return await _give_up(client, task.id, why, EXIT_NOT_COMPLETED)
    return await _give_up(client, task.id, f"timed out after {plan.timeout:g} s", EXIT_NOT_COMPLETED)


async def _outcome(client: AsyncClient, follower: Follower, result_output: TextIO) -> int:
    task_id = follower.task.id
    if follower.parked is not None:
        return await _give_up(
            client, task_id, f"parked: {follower.parked}; the workflow's code no longer replays", EXIT_NOT_COMPLETED
        )
    final = await client.wait_for_result(task_id, timeout=30)  # the ending event was seen: it is terminal
    if final.status == "completed":
        print(json.dumps(final.result, indent=2, ensure_ascii=False), file=result_output, flush=True)
        return EXIT_COMPLETED
    detail = f": {brief(final.error)}" if final.error is not None else ""
    say(f"controlplane exec: task {task_id} {final.status.replace('_', ' ')}{detail}")
    return EXIT_NOT_COMPLETED


async def _give_up(client: AsyncClient, task_id: str, why: str, status: int) -> int:
    """Cancels the task, so no runner picks it up later from a queue nobody watches any more."""
    try:
        cancelled = await client.cancel(task_id, reason=f"controlplane exec: {why}")
        ended = f"task {task_id} cancelled" if cancelled.status == "cancelled" else f"task {task_id} {cancelled.status}"
    except ProblemError as exc:  # it ended meanwhile (409), or the key may not cancel
        ended = f"task {task_id} not cancelled ({exc.detail})"
    except httpx.TransportError as exc:
        ended = f"task {task_id} not cancelled: the gateway cannot be reached ({exc!r})"
    say(f"controlplane exec: {why}; {ended}")
    return status


async def _stop_runner(stop: asyncio.Event, running: asyncio.Task[None]) -> None:
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(running), DRAIN_SECONDS)
    except TimeoutError:  # a step that does not return: its lease expires, the task was cancelled anyway
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
    except Exception:  # already reported by _submit_and_follow as why the run stopped
        return


async def _deregister(plan: Plan) -> None:
    """The worker's record goes: a temporary runner must not show as an offline worker for ever."""
    try:
        async with AsyncClient(plan.url, api_key=plan.key, retry_seconds=10) as client:
            await client.workers.deregister(plan.worker_id)
    except NotFound:
        pass
    except (ProblemError, Unavailable, httpx.HTTPError) as exc:
        say(f"controlplane exec: could not deregister worker {plan.worker_id}: {exc!r}")
