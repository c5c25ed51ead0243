"""``controlplane export`` and ``controlplane audit verify``: an export of a real log verifies, and
every edited, dropped, reordered, appended or cut line makes it fail, naming the first bad line."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.embedded import EmbeddedNats
from controlplane.export import export_org
from controlplane.task_log import opened, task_history
from core.domain.access import issue_key
from core.domain.audit import GENESIS, AuditChain, verify_export
from core.domain.commands import (
    SYSTEM,
    Actor,
    ClaimTask,
    CompleteTask,
    CreateApiKey,
    DecideApproval,
    RecordOperation,
    RegisterWorker,
    RequestApproval,
    SubmitTask,
)
from core.domain.events import decode_event
from core.domain.ids import new_id
from core.domain.public import redacted_fields
from core.log.handler import CommandHandler
from core.log.store import JetStreamEventStore
from tests.tools.conftest import Cli

pytestmark = pytest.mark.integration

WORKER = Actor("w1", frozenset({"worker"}))


async def some_work(handler: CommandHandler, org: str, tasks: int = 3) -> list[str]:
    """Workers and tasks with journals, approvals and results, as an org's log holds them."""
    await handler.handle(org, RegisterWorker(worker_id="w1", capabilities=("gpu",)), actor=WORKER)
    ids = []
    for number in range(tasks):
        task_id = new_id()
        lease = {"worker_id": "w1", "lease_id": f"l{number}"}
        await handler.handle(
            org,
            SubmitTask(task_id=task_id, task_type="deploy", payload={"n": number, "note": "é ✓"}),
            actor=Actor("alice", frozenset({"submitter"})),
            correlation_id=f"corr-{number}",
        )
        await handler.handle(org, ClaimTask(task_id=task_id, **lease, lease_seconds=600), actor=WORKER)
        await handler.handle(
            org,
            RecordOperation(task_id=task_id, **lease, index=0, kind="step", name="plan", result=[number]),
            actor=WORKER,
        )
        await handler.handle(
            org,
            RequestApproval(task_id=task_id, **lease, approval_id=f"{task_id}-1", reason="ship?", journal_index=1),
            actor=WORKER,
        )
        await handler.handle(
            org,
            DecideApproval(task_id=task_id, approval_id=f"{task_id}-1", decision="approve"),
            actor=Actor("bob", frozenset({"approver"})),
        )
        lease = {"worker_id": "w1", "lease_id": f"m{number}"}
        await handler.handle(org, ClaimTask(task_id=task_id, **lease, lease_seconds=600), actor=WORKER)
        await handler.handle(org, CompleteTask(task_id=task_id, **lease, result={"ok": number}), actor=WORKER)
        ids.append(task_id)
    return ids


@pytest.fixture
async def exported(handler: CommandHandler, org: str, cli: Cli, tmp_path: Path) -> list[bytes]:
    await some_work(handler, org)
    path = tmp_path / "audit.jsonl"
    ran = await cli("export", org, "--output", str(path))
    assert ran.code == 0, ran.err
    lines = path.read_bytes().splitlines(keepends=True)
    assert f"head {json.loads(lines[-1])['hash']}" in ran.err
    return lines


def check(lines: list[bytes], head: str | None = None) -> tuple[int, str] | None:
    report = verify_export(lines, expected_head=head)
    return None if report.problem is None else (report.problem.line, report.problem.reason)


async def test_an_export_holds_every_event_as_stored_and_verifies(
    exported: list[bytes], store: JetStreamEventStore, org: str, cli: Cli, tmp_path: Path
) -> None:
    header, *events, end = (json.loads(line) for line in exported)
    assert (header["kind"], header["org"], header["since"], header["prev"]) == ("header", org, None, GENESIS)
    assert end == {**end, "kind": "end", "events": len(events), "last_seq": events[-1]["seq"]}
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    submit = next(e for e in events if e["event"]["type"] == "TaskSubmitted")
    assert (submit["actor"], submit["correlation_id"]) == ("alice", "corr-0")
    assert submit["event"]["payload"] == {"n": 0, "note": "é ✓"}
    history = await task_history(store, org, submit["event"]["task_id"])
    from_log = {item.seq: item.event for item in history}
    for line in events:
        if line["seq"] in from_log:
            assert decode_event(msgspec.json.encode(line["event"])) == from_log[line["seq"]]
    assert {e["event"]["type"] for e in events} >= {"WorkerRegistered", "ApprovalDecided", "TaskCompleted"}

    ran = await cli("audit", "verify", str(tmp_path / "audit.jsonl"), "--head", end["hash"])
    assert ran.code == 0, ran.out
    assert ran.out.startswith(f"ok: {len(events)} events of org {org}")


async def test_the_export_on_stdout_is_the_same_file(exported: list[bytes], org: str, cli: Cli) -> None:
    ran = await cli("export", org)
    assert ran.code == 0
    assert ran.out.encode().splitlines(keepends=True) == exported


async def test_every_kind_of_tampering_fails_at_the_first_bad_line(
    exported: list[bytes], cli: Cli, tmp_path: Path
) -> None:
    assert check(exported) is None
    event_line = 3
    edited = list(exported)
    edited[event_line - 1] = edited[event_line - 1].replace(b'"deploy"', b'"deplOy"', 1)
    assert edited != exported
    dropped = exported[:4] + exported[5:]
    swapped = [*exported[:4], exported[5], exported[4], *exported[6:]]
    reencoded = list(exported)
    reencoded[2] = reencoded[2].replace(b'","', b'", "', 1)
    appended = [*exported, exported[2]]
    cases = {
        "edited": (edited, event_line, "edited"),
        "dropped": (dropped, 5, "dropped"),
        "reordered": (swapped, 5, "reordered"),
        "re-encoded": (reencoded, 3, "canonical"),
        "header dropped": (exported[1:], 1, "header"),
        "last event dropped": (exported[:-2] + exported[-1:], len(exported) - 1, "dropped"),
        "end line dropped": (exported[:-1], len(exported), "without its end line"),
        "appended": (appended, len(exported) + 1, "follows the end line"),
    }
    for name, (lines, line, reason) in cases.items():
        problem = check(lines)
        assert problem is not None, name
        assert problem[0] == line and reason in problem[1], (name, problem)

    path = tmp_path / "tampered.jsonl"
    path.write_bytes(b"".join(swapped))
    ran = await cli("audit", "verify", str(path))
    assert ran.code == 1
    assert ran.out.startswith("line 5: ") and "reordered" in ran.out
    as_json = await cli("audit", "verify", str(path), "--json")
    assert json.loads(as_json.out)["problem"]["line"] == 5
    missing = await cli("audit", "verify", str(tmp_path / "nowhere.jsonl"))
    assert missing.code == 2 and "cannot read" in missing.err


async def test_an_export_shows_no_key_hash_and_verifies_as_written(
    handler: CommandHandler, org: str, cli: Cli, tmp_path: Path
) -> None:
    issued = issue_key()
    await handler.handle(
        org,
        CreateApiKey(key_id=issued.key_id, name="ci", roles=("viewer",), secret_sha256=issued.secret_sha256),
        actor=SYSTEM,
    )
    await some_work(handler, org, tasks=1)
    path = tmp_path / "audit.jsonl"
    ran = await cli("export", org, "--output", str(path))
    assert ran.code == 0, ran.err
    exported = path.read_bytes()
    assert issued.secret_sha256.encode() not in exported
    header, *events, end = (json.loads(line) for line in exported.splitlines())
    assert header["redacted"] == redacted_fields() and "ApiKeyCreated.secret_sha256" in header["redacted"]
    [created] = [e["event"] for e in events if e["event"]["type"] == "ApiKeyCreated"]
    assert created["key_id"] == issued.key_id and created["secret_sha256"] == "[redacted]"
    ran = await cli("audit", "verify", str(path), "--head", end["hash"])
    assert ran.code == 0, ran.out
    assert ran.out.startswith(f"ok: {len(events)} events of org {org}")


def rehashed(lines: list[bytes], change: bytes, to: bytes) -> list[bytes]:
    """What a forger does: edit a line and write the chain again from there on."""
    chain = AuditChain()
    out = []
    for raw in lines:
        fields = msgspec.json.decode(raw.replace(change, to))
        kind = fields.pop("kind")
        for chained in ("prev", "hash"):
            fields.pop(chained)
        if kind == "header":
            out.append(chain.header(fields["org"], fields["since"], fields.get("redacted", ())))
        elif kind == "event":
            out.append(chain.event(**fields))
        else:
            out.append(chain.end())
    return out


def test_a_rewritten_chain_is_caught_only_by_the_kept_head(exported: list[bytes]) -> None:
    head = json.loads(exported[-1])["hash"]
    forged = rehashed(exported, b'"deploy"', b'"deplOy"')
    assert check(forged) is None, "a consistent chain verifies on its own"
    problem = check(forged, head)
    assert problem is not None and "not the export whose head you kept" in problem[1]
    assert check(exported, head) is None


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_single_change_to_an_export_fails(exported_once: list[bytes], data: st.DataObject) -> None:
    lines = list(exported_once)
    size = len(lines)
    change = data.draw(st.sampled_from(["drop", "duplicate", "swap", "edit", "move"]))
    first = data.draw(st.integers(0, size - 1))
    if change == "drop":
        del lines[first]
    elif change == "duplicate":
        lines.insert(first, lines[first])
    elif change in ("swap", "move"):
        second = data.draw(st.integers(0, size - 1).filter(lambda i: i != first))
        if change == "swap":
            lines[first], lines[second] = lines[second], lines[first]
        else:
            lines.insert(second, lines.pop(first))
    else:
        fields = msgspec.json.decode(lines[first])
        key = data.draw(st.sampled_from(sorted(k for k in fields if k != "hash")))
        fields[key] = data.draw((st.integers() | st.text(max_size=5) | st.none()).filter(lambda v: v != fields[key]))
        lines[first] = msgspec.json.encode(fields, order="sorted") + b"\n"
    assert lines != exported_once
    assert check(lines) is not None, change


@pytest.fixture(scope="module")
def exported_once(nats_server: EmbeddedNats) -> list[bytes]:
    """One export of a real log for the property test (hypothesis runs it many times)."""

    async def produce() -> list[bytes]:
        org = f"audit-{new_id()[-10:]}"
        async with opened(nats_server.url) as store:
            handler = CommandHandler(store)
            await some_work(handler, org, tasks=2)
            out = io.BytesIO()
            await export_org(store.reader, org, out)
        return out.getvalue().splitlines(keepends=True)

    return asyncio.run(produce())


async def test_since_exports_only_what_was_stored_from_then_on(handler: CommandHandler, org: str, cli: Cli) -> None:
    await some_work(handler, org, tasks=1)
    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    later = await some_work(handler, org, tasks=1)
    ran = await cli("export", org, "--since", since.isoformat())
    lines = ran.out.encode().splitlines(keepends=True)
    assert check(lines) is None
    header, *events, _ = (json.loads(line) for line in lines)
    assert header["since"].startswith(since.strftime("%Y-%m-%dT%H:%M:%S"))
    tasks = {e["event"]["task_id"] for e in events if e["event"]["type"] == "TaskSubmitted"}
    assert tasks == set(later)
    assert all(e["stored_at"] >= header["since"][:-1] for e in events)

    bad = await cli("export", org, "--since", "yesterday")
    assert bad.code == 2 and "RFC 3339" in bad.err
