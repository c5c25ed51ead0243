"""schemathesis against /openapi.json, bounded to ~200 generated requests: no input may produce a 5xx."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.gateway.conftest import Stack

pytestmark = pytest.mark.integration

MAX_EXAMPLES_PER_OPERATION = 10  # x 25 operations: ~200 requests reach the API


async def test_fuzzing_the_schema_finds_no_server_errors(stack: Stack, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).parent / "schemathesis"
    before = _requests_served(stack)
    limits = stack.services.limits
    block_ms, limits.max_block_ms = limits.max_block_ms, 100  # generated long-polls would only wait
    process = await asyncio.create_subprocess_exec(
        str(schemathesis),
        "run",
        f"{stack.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES_PER_OPERATION),
        "--exclude-path-regex",
        "/events$",  # streams never end by design
        "--header",
        f"Authorization: Bearer {stack.keys['acme']['admin']}",
        "--request-timeout",
        "10",
        "--seed",
        "20261121",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 300)
    finally:
        limits.max_block_ms = block_ms
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "Fuzzing" in text, text[-3000:]
    served = _requests_served(stack) - before
    print(f"schemathesis sent {served} requests; no 5xx")
    assert served >= 150, f"the fuzzer reached the API only {served} times:\n{text[-3000:]}"
    # Whatever the fuzzer got accepted must also be projectable: no read model may stall or skip an event.
    async with asyncio.timeout(30):
        await stack.projector.run_until_caught_up()
    assert set(stack.projector.skipped.values()) == {0}


def _requests_served(stack: Stack) -> int:
    return int(
        sum(
            sample.value
            for metric in stack.services.metrics.requests.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
    )
