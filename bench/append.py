"""Append benchmark: the command handler against raw ``js.publish`` on the same server, same run.

Reports per-command latency (sequential, one in flight) and throughput with many commands in flight.
Starts its own nats-server from the wheel unless NATS_URL is set.

    .venv/bin/python bench/append.py [--commands 3000] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from controlplane.embedded import EmbeddedNats
from core.domain.commands import SYSTEM, Actor, ClaimTask, SubmitTask
from core.domain.events import encode_event
from core.domain.ids import new_id
from core.log.event_store import AppendMeta
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore

WORKER = Actor("bench-worker", frozenset({"worker"}))
RAW = "raw js.publish (same body and headers)"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(n: int, op: Callable[[int], Awaitable[object]]) -> list[float]:
    latencies = []
    for i in range(n):
        start = time.perf_counter()
        await op(i)
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


async def pipelined(n: int, concurrency: int, op: Callable[[int], Awaitable[object]]) -> float:
    """Events per second with ``concurrency`` operations in flight."""
    queue = iter(range(n))

    async def lane() -> None:
        for i in queue:
            await op(i)

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def run(url: str, commands: int, concurrency: int) -> None:
    store = await JetStreamEventStore.connect(url)
    handler = CommandHandler(store)
    js = store.nc.jetstream()
    org = f"bench-{new_id()[-8:]}"
    payload = {"prompt": "summarise the incident", "env": "prod"}
    sample = (
        await handler.handle(org, SubmitTask(task_id="sample", task_type="agent", payload=payload), actor=SYSTEM)
    ).events[0]
    same_body = encode_event(sample.event)

    async def raw_publish(i: int) -> None:
        await js.publish(f"cp.{org}.raw.r{i}", b'{"type":"TaskSubmitted"}', headers={"Nats-Msg-Id": f"raw-{org}-{i}"})

    async def raw_same_message(i: int) -> None:
        """What the handler puts on the wire for a submit: same body, same headers, same checks."""
        meta = AppendMeta(f"same-{i}", SYSTEM.id, sample.recorded_at)
        headers = JetStreamEventStore._event_headers(sample.event, meta, 0, 0)
        await js.publish(f"cp.{org}.same.s{i}", same_body, headers=headers)

    def submit(prefix: str) -> Callable[[int], Awaitable[object]]:
        async def op(i: int) -> None:
            await handler.handle(
                org, SubmitTask(task_id=f"{prefix}{i}", task_type="agent", payload=payload), actor=SYSTEM
            )

        return op

    await sequential(200, raw_publish)  # warm up every path
    await sequential(200, raw_same_message)
    await sequential(200, submit("warm"))

    results: dict[str, list[float]] = {}
    for round_ in range(3):  # interleave to share whatever the machine is doing
        base = 100_000 * (round_ + 1)
        results.setdefault("raw js.publish (minimal message)", []).extend(
            await sequential(commands // 3, lambda i, b=base: raw_publish(b + i))
        )
        results.setdefault(RAW, []).extend(await sequential(commands // 3, lambda i, b=base: raw_same_message(b + i)))
        results.setdefault("handler submit (1 event)", []).extend(
            await sequential(commands // 3, submit(f"s{round_}-"))
        )
    # claims on tasks this process knows: one event plus its lease timer, in one atomic batch
    await sequential(commands, submit("c"))
    results["handler claim (event + lease timer)"] = await sequential(
        commands,
        lambda i: handler.handle(org, ClaimTask(task_id=f"c{i}", worker_id="w1", lease_id=f"l{i}"), actor=WORKER),
    )

    raw_rate = await pipelined(commands * 5, concurrency, lambda i: raw_same_message(10_000_000 + i))
    handler_rate = await pipelined(commands * 5, concurrency, submit("p"))

    raw_p50 = statistics.median(results[RAW])
    print(f"event loop: uvloop {uvloop.__version__}")
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    print("| operation | n | p50 ms | p99 ms | p50 vs raw |")
    print("|---|---|---|---|---|")
    for name, samples in results.items():
        p50 = statistics.median(samples)
        print(f"| {name} | {len(samples)} | {p50:.3f} | {percentile(samples, 0.99):.3f} | {p50 / raw_p50:.2f}x |")
    print()
    print(f"| throughput, {concurrency} in flight | events/s |")
    print("|---|---|")
    print(f"| {RAW} | {raw_rate:,.0f} |")
    print(f"| handler submit | {handler_rate:,.0f} |")
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    if url := os.environ.get("NATS_URL"):
        uvloop.run(run(url, args.commands, args.concurrency))
        return
    with tempfile.TemporaryDirectory() as data, EmbeddedNats(Path(data)) as server:
        uvloop.run(run(server.url, args.commands, args.concurrency))


if __name__ == "__main__":
    main()
