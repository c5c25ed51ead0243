"""The log on a three-node JetStream cluster (R3) loses nothing when a node dies mid-run.

Task lifecycles run through three command handlers, one per node, each retrying a command with its own
id until the log acknowledges it (what a gateway's client does on a 503). A node is SIGKILLed a third
of the way through and started again at two thirds. Afterwards every acknowledged command is in the
log exactly once, at the sequences it was acknowledged with, and the restarted node holds the same log
as the others."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import pytest

from controlplane.cluster import EmbeddedNatsCluster
from core.domain.commands import (
    SYSTEM,
    Actor,
    ClaimTask,
    Command,
    CompleteTask,
    DecideApproval,
    RequestApproval,
    SubmitTask,
)
from core.domain.errors import ConcurrencyExhausted
from core.domain.events import (
    ApprovalDecided,
    ApprovalRequested,
    TaskClaimed,
    TaskCompleted,
    TaskSubmitted,
)
from core.domain.ids import new_id
from core.domain.subjects import aggregate_subject
from core.log.event_store import StoreError
from core.log.handler import CommandHandler
from core.log.store import STREAM_NAME, JetStreamEventStore

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

WORKER = Actor("worker-key", frozenset({"worker"}))
APPROVER = Actor("approver-key", frozenset({"approver"}))
TASKS = 300
"""Six commands (six events) each: 1,800 acknowledged appends per run."""
CONCURRENCY = 30
COMMAND_DEADLINE_SECONDS = 30.0
RETRY_DELAY_SECONDS = 0.05
EXPECTED_EVENTS = [
    TaskSubmitted,
    TaskClaimed,
    ApprovalRequested,
    ApprovalDecided,
    TaskClaimed,
    TaskCompleted,
]


def lifecycle(task_id: str) -> list[tuple[Command, Actor]]:
    """Submit, claim, ask for approval, approve (one event carrying the deciding vote), claim again, complete.
    Claims arm lease timers (schedules pipelined with the event) that later commands retire; leases
    are long so that no timer fires during the test and the log holds only commands' events."""
    return [
        (SubmitTask(task_id=task_id, task_type="deploy"), SYSTEM),
        (ClaimTask(task_id=task_id, worker_id="w1", lease_id="l1", lease_seconds=3600), WORKER),
        (RequestApproval(task_id=task_id, worker_id="w1", lease_id="l1", approval_id="a1", reason="ship?"), WORKER),
        (DecideApproval(task_id=task_id, approval_id="a1", decision="approve"), APPROVER),
        (ClaimTask(task_id=task_id, worker_id="w1", lease_id="l2", lease_seconds=3600), WORKER),
        (CompleteTask(task_id=task_id, worker_id="w1", lease_id="l2", result={"ok": True}), WORKER),
    ]


class Lifecycles:
    """Drives ``TASKS`` lifecycles concurrently; task ``i`` always goes through handler ``i % 3``, as a
    client sticks to its gateway, and records what the log acknowledged."""

    def __init__(self, org: str, handlers: list[CommandHandler]) -> None:
        self.org = org
        self.handlers = handlers
        self.acknowledged: dict[str, tuple[int, ...]] = {}
        """Command id -> the stream sequences of its events, as the handler returned them."""
        self.attempts: list[tuple[float, float]] = []
        """(started, acknowledged) of every successful attempt, in monotonic seconds."""
        self.retries = 0
        self._driving: asyncio.Task[None] | None = None

    @property
    def total(self) -> int:
        return TASKS * len(lifecycle("t"))

    def start(self) -> None:
        self._driving = asyncio.create_task(self._drive())

    async def finished(self, within: float = 60) -> None:
        assert self._driving is not None
        async with asyncio.timeout(within):
            await self._driving

    async def acknowledged_at_least(self, count: int) -> None:
        assert self._driving is not None
        while len(self.acknowledged) < count:
            if self._driving.done():
                self._driving.result()  # raises what stopped the run
                raise AssertionError(f"the run ended after {len(self.acknowledged)} of {count} commands")
            await asyncio.sleep(0.01)

    def pause_after(self, moment: float) -> float:
        """How long after ``moment`` the log first acknowledged an append sent after it."""
        resumed = min(done for started, done in self.attempts if started > moment)
        return resumed - moment

    async def _drive(self) -> None:
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one_task(index: int) -> None:
            async with slots:
                task_id = f"t{index:04d}"
                for step, (command, actor) in enumerate(lifecycle(task_id)):
                    # Unique across runs: the log deduplicates message ids stream-wide, not per org.
                    command_id = f"{self.org}-{task_id}-{step}"
                    await self._until_acknowledged(self.handlers[index % 3], command, actor, command_id)

        async with asyncio.TaskGroup() as group:
            for index in range(TASKS):
                group.create_task(one_task(index))

    async def _until_acknowledged(
        self, handler: CommandHandler, command: Command, actor: Actor, command_id: str
    ) -> None:
        deadline = time.monotonic() + COMMAND_DEADLINE_SECONDS
        while True:
            started = time.monotonic()
            try:
                outcome = await handler.handle(self.org, command, actor=actor, command_id=command_id)
            # The gateway answers these with 503 or "409, retry the request": a client retries with the same id.
            except (StoreError, ConcurrencyExhausted, nats.errors.Error) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{command_id} not acknowledged in {COMMAND_DEADLINE_SECONDS}s") from exc
                self.retries += 1
                await asyncio.sleep(RETRY_DELAY_SECONDS)
                continue
            self.attempts.append((started, time.monotonic()))
            self.acknowledged[command_id] = tuple(event.seq for event in outcome.events)
            return


async def until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


async def stream_leader(cluster: EmbeddedNatsCluster, within: float) -> int:
    """The node leading the log, once one does."""
    async with asyncio.timeout(within):
        while (leader := await asyncio.to_thread(cluster.stream_leader, STREAM_NAME)) is None:
            await asyncio.sleep(0.05)
        return leader


async def assert_log_holds_exactly(store: JetStreamEventStore, run: Lifecycles) -> None:
    """Every acknowledged command's events are in the log once, at the acknowledged sequences, in
    lifecycle order; the log holds nothing else for these tasks."""
    logged: dict[str, list[int]] = {}
    for index in range(TASKS):
        history = await store.read_subject(aggregate_subject(run.org, "task", f"t{index:04d}"))
        assert [type(item.event) for item in history] == EXPECTED_EVENTS, f"task t{index:04d}"
        for item in history:
            assert item.command_id is not None, f"an event without a command in t{index:04d}: {item}"
            logged.setdefault(item.command_id, []).append(item.seq)
    assert len(run.acknowledged) == run.total
    assert {command: tuple(seqs) for command, seqs in logged.items()} == run.acknowledged


@dataclass
class Failover:
    run: Lifecycles
    killed_at: float
    leader_while_down: int


async def run_with_a_node_killed(
    cluster: EmbeddedNatsCluster, stores: list[JetStreamEventStore], victim: int
) -> Failover:
    """Kill ``victim`` a third of the way through the run and start it again at two thirds."""
    handlers = [CommandHandler(store) for store in stores]
    run = Lifecycles(f"org-{new_id()[-10:]}", handlers)
    run.start()
    await run.acknowledged_at_least(run.total // 3)
    killed_at = time.monotonic()
    cluster.kill(victim)
    leader_while_down = await stream_leader(cluster, within=20)
    elected_after = time.monotonic() - killed_at
    await run.acknowledged_at_least(2 * run.total // 3)
    await asyncio.to_thread(cluster.start, victim)
    await run.finished()
    log.info(
        "node %d killed: node %d led the log %.2fs later, appends resumed after %.2fs, %d retries",
        victim,
        leader_while_down,
        elected_after,
        run.pause_after(killed_at),
        run.retries,
    )
    assert stores[victim].nc.stats["reconnects"] >= 1, "the killed node's client moved to another node"
    assert all(store.nc.is_connected for store in stores)
    return Failover(run, killed_at, leader_while_down)


async def assert_restarted_node_catches_up(cluster: EmbeddedNatsCluster, victim: int) -> None:
    """The restarted node ends with the same last sequence as the leader."""
    leader = await stream_leader(cluster, within=15)
    last_seq = await asyncio.to_thread(cluster.stream_last_seq, leader, STREAM_NAME)
    started = time.monotonic()

    async def caught_up() -> bool:
        return await asyncio.to_thread(cluster.stream_last_seq, victim, STREAM_NAME) == last_seq

    await until(caught_up, within=15)
    log.info("node %d at last seq %d, %.2fs after the run", victim, last_seq, time.monotonic() - started)


async def test_the_log_is_replicated_on_three_nodes_and_connecting_keeps_it_so(
    cluster: EmbeddedNatsCluster, stores: list[JetStreamEventStore]
) -> None:
    info = await stores[0].nc.jetstream().stream_info(STREAM_NAME)
    assert info.config.num_replicas == 3
    assert info.cluster is not None and info.cluster.leader in cluster.names
    assert sorted(peer.name for peer in info.cluster.replicas or []) == sorted(
        name for name in cluster.names if name != info.cluster.leader
    )
    # Every process provisions on connect, with no replica count of its own: that must not scale down.
    again = await JetStreamEventStore.connect(cluster.urls)
    try:
        assert (await again.nc.jetstream().stream_info(STREAM_NAME)).config.num_replicas == 3
    finally:
        await again.close()


async def test_killing_a_follower_mid_run_loses_no_acknowledged_command(
    cluster: EmbeddedNatsCluster, stores: list[JetStreamEventStore]
) -> None:
    leader = cluster.stream_leader(STREAM_NAME)
    assert leader is not None
    victim = (leader + 1) % 3

    failover = await run_with_a_node_killed(cluster, stores, victim)

    assert failover.leader_while_down == leader
    assert failover.run.pause_after(failover.killed_at) < 5, "the other nodes' clients never stopped"
    await assert_restarted_node_catches_up(cluster, victim)
    await assert_log_holds_exactly(stores[leader], failover.run)


async def test_killing_the_stream_leader_mid_run_elects_another_and_loses_nothing(
    cluster: EmbeddedNatsCluster, stores: list[JetStreamEventStore]
) -> None:
    victim = cluster.stream_leader(STREAM_NAME)
    assert victim is not None

    failover = await run_with_a_node_killed(cluster, stores, victim)

    assert failover.leader_while_down != victim
    assert failover.run.pause_after(failover.killed_at) < 20, "appends resumed once a new leader was elected"
    await assert_restarted_node_catches_up(cluster, victim)
    await assert_log_holds_exactly(stores[failover.leader_while_down], failover.run)
