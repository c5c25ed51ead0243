"""schemathesis against /openapi.json: no input may produce a 5xx.

``make test`` runs it bounded (10 cases per operation, ~250 requests); ``CP_FUZZ_CASES=N`` asks for at
least N cases in all (``make test-chaos``: 2,000). It prints the cases tried and the 5xx seen."""

from __future__ import annotations

import asyncio
import math
import os
import re
import sys
from pathlib import Path

import pytest

from gateway.app import ROUTES
from gateway.openapi import openapi_document
from tests.gateway.conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

BOUNDED_EXAMPLES_PER_OPERATION = 10
CASES = int(os.environ["CP_FUZZ_CASES"]) if os.environ.get("CP_FUZZ_CASES") else None
EXCLUDED_PATHS = "/events$"  # streams never end by design
SECONDS_PER_CASE = 0.5  # the time budget: ~0.1 s per case on this 2-core machine, with room
UNDER_GENERATION_MARGIN = 1.1


async def test_fuzzing_the_schema_finds_no_server_errors(stack: Stack, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).parent / "schemathesis"
    with_input, without_input = _fuzzed_operations()
    operations = with_input + without_input
    # An operation without parameters or body has one case, however many are asked for; one whose input
    # space is small (a single path parameter) runs out of distinct cases early, hence the margin.
    per_operation = (
        BOUNDED_EXAMPLES_PER_OPERATION
        if CASES is None
        else math.ceil(CASES * UNDER_GENERATION_MARGIN / with_input - without_input / with_input)
    )
    before, server_errors_before = _requests_served(stack), _requests_served(stack, "5")
    # Earlier tests of the session may have put poison on the shared stream on purpose: only new skips count.
    async with asyncio.timeout(30):
        await stack.projector.run_until_caught_up()
    skipped_before = dict(stack.projector.skipped)
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
        str(per_operation),
        "--exclude-path-regex",
        EXCLUDED_PATHS,
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
        output, _ = await asyncio.wait_for(
            process.communicate(), max(300, per_operation * operations * SECONDS_PER_CASE)
        )
    finally:
        limits.max_block_ms = block_ms
    text = output.decode(errors="replace")
    served, server_errors = _requests_served(stack) - before, _requests_served(stack, "5") - server_errors_before
    generated = re.search(r"(\d+) generated", text)
    cases = int(generated[1]) if generated else 0
    print(
        f"\nschemathesis: {cases} cases generated ({per_operation} per operation, {operations} operations), "
        f"{served} requests served, 5xx seen: {server_errors}"
    )
    assert process.returncode == 0, text[-6000:]
    assert server_errors == 0, text[-6000:]
    assert "Fuzzing" in text, text[-3000:]
    assert served >= 150, f"the fuzzer reached the API only {served} times:\n{text[-3000:]}"
    if CASES is not None:
        assert cases >= CASES, f"asked for {CASES} cases, schemathesis generated {cases}:\n{text[-3000:]}"
    # Whatever the fuzzer got accepted must also be projectable: no read model may stall or skip an event.
    async with asyncio.timeout(30):
        await stack.projector.run_until_caught_up()
    new_skips = {name: skipped - skipped_before[name] for name, skipped in stack.projector.skipped.items()}
    assert set(new_skips.values()) == {0}, new_skips


def _requests_served(stack: Stack, status_class: str = "") -> int:
    """Requests the gateway answered so far, all or those whose status starts with ``status_class``."""
    return int(
        sum(
            sample.value
            for metric in stack.services.metrics.requests.collect()
            for sample in metric.samples
            if sample.name.endswith("_total") and sample.labels["status"].startswith(status_class)
        )
    )


def _fuzzed_operations() -> tuple[int, int]:
    """How many operations schemathesis tests: (with parameters or a body, without)."""
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    operations = [
        operation
        for path, item in openapi_document(ROUTES)["paths"].items()
        if not re.search(EXCLUDED_PATHS, path)
        for method, operation in item.items()
        if method in methods
    ]
    with_input = sum(bool(operation.get("parameters") or operation.get("requestBody")) for operation in operations)
    return with_input, len(operations) - with_input
