"""The README's quick-start blocks, run as they are written against a stack, in a directory holding the
``.controlplane/dev.json`` that ``make run`` writes: each prints what its comment says it prints."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from tests.gateway.conftest import Stack

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
QUICK_START = re.compile(r"<!-- quick-start: (?P<name>\w+)[^>]*-->\n```python\n(?P<code>.*?)```", re.DOTALL)
PROMISED_OUTPUT = re.compile(r"^\s*print\(.*\)  # (?P<output>.*)$", re.MULTILINE)


def quick_starts() -> dict[str, str]:
    return {found["name"]: found["code"] for found in QUICK_START.finditer(README.read_text())}


def test_the_readme_has_both_quick_starts() -> None:
    assert sorted(quick_starts()) == ["async", "sync"]


@pytest.mark.parametrize("name", ["sync", "async"])
async def test_the_readme_quick_start_runs_as_written(
    name: str, stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = quick_starts()[name]
    promised = PROMISED_OUTPUT.search(code)
    assert promised is not None, "the block says what it prints"
    (tmp_path / ".controlplane").mkdir()
    (tmp_path / ".controlplane" / "dev.json").write_text(json.dumps({"gateway_url": stack.url, "orgs": stack.keys}))
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()

    def run() -> None:  # in a thread: the gateway serves on this test's event loop
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{README}:quick-start:{name}", "exec"), {"__name__": "__main__"})

    await asyncio.wait_for(asyncio.to_thread(run), 60)
    assert printed.getvalue() == promised["output"] + "\n"
