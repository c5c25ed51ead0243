"""Secrets over the real stack: an admin sets them (write-only) and lists names and versions; only the
worker holding a task's lease reads one, its environment's version before the org-wide one; the task's
first read pins the version through rotations; every read is a ``SecretRead`` on the task; and the
value in clear is nowhere but the read's answer: not in the log's raw bytes or files, the SSE feeds,
an export, a log line or a problem detail. Each test seeds an org of its own."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.cli import main
from controlplane.embedded import EmbeddedNats
from core.domain.events import SecretRead, SecretVersionSet
from core.domain.ids import new_id
from core.domain.public import REDACTED
from core.domain.subjects import aggregate_subject, org_events_filter
from core.secret_box import SecretBox, generate_key_text
from runners.context import WorkflowContext
from runners.registry import Registry, workflow
from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import _read_sse, appended_since, problem, queue
from tests.gateway.test_runner import running, until

pytestmark = pytest.mark.integration


def client(stack: Stack, key: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}", **headers}, timeout=20)


def clear_value() -> str:
    return f"s3cr3t-{secrets.token_hex(16)}"


async def put_secret(admin: httpx.AsyncClient, name: str, value: str, **fields: Any) -> dict[str, Any]:
    r = await admin.put(f"/v1/secrets/{name}", json={"value": value, **fields})
    assert r.status_code == 200, r.text
    return r.json()


async def claimed(worker: httpx.AsyncClient, admin: httpx.AsyncClient, q: str) -> tuple[str, dict[str, str]]:
    """A task submitted to ``q`` and claimed by ``worker``: its id and lease."""
    task = (await admin.post("/v1/tasks", json={"type": "deploy", "queue": q})).json()
    r = await worker.post("/v1/tasks/claim", json={"worker_id": "w1", "queue": q})
    assert r.status_code == 200, r.text
    assert r.json()["task"]["id"] == task["id"]
    return task["id"], {"worker_id": "w1", "lease_id": r.json()["lease"]["id"]}


async def test_an_admin_sets_and_lists_secrets_and_the_listing_never_holds_a_value(stack: Stack) -> None:
    _org, keys = await new_org(stack)
    first, second = clear_value(), clear_value()
    async with client(stack, keys["admin"]) as admin:
        assert (await admin.put("/v1/environments/prod", json={"queues": [queue()]})).status_code == 200
        assert (await admin.get("/v1/secrets")).json() == {"items": [], "seq": 0}
        set1 = await put_secret(admin, "DB_PASSWORD", first)
        assert {k: set1[k] for k in ("name", "version", "environment")} == {
            "name": "DB_PASSWORD",
            "version": 1,
            "environment": None,
        }
        assert set1["seq"] > 0 and "value" not in set1
        set2 = await put_secret(admin, "DB_PASSWORD", second, environment="prod")
        assert (set2["version"], set2["environment"]) == (2, "prod"), "versions count per name, across scopes"

        listed = await admin.get("/v1/secrets")
        assert listed.status_code == 200
        assert [(i["name"], i["environment"], i["version"], i["versions"]) for i in listed.json()["items"]] == [
            ("DB_PASSWORD", None, 1, [1]),
            ("DB_PASSWORD", "prod", 2, [2]),
        ]
        assert listed.json()["seq"] == set2["seq"]
        assert first not in listed.text and second not in listed.text

        again = await admin.put("/v1/secrets/DB_PASSWORD", json={"value": first}, headers={"Idempotency-Key": "k1"})
        retried = await admin.put("/v1/secrets/DB_PASSWORD", json={"value": first}, headers={"Idempotency-Key": "k1"})
        assert again.json() == retried.json() and again.json()["version"] == 3, "a retry records nothing new"
        other = await admin.put("/v1/secrets/DB_PASSWORD", json={"value": second}, headers={"Idempotency-Key": "k1"})
        assert other.json()["version"] == 4, "the same key with another value is another command"


async def test_only_admins_set_or_list_and_refusals_append_nothing_nor_echo_the_value(stack: Stack) -> None:
    org, keys = await new_org(stack)
    value = clear_value()
    async with client(stack, keys["admin"]) as admin:
        seq = (await put_secret(admin, "token", value))["seq"]
        for role in ("submitter", "worker", "approver", "viewer"):
            async with client(stack, keys[role]) as other:
                assert value not in problem(await other.put("/v1/secrets/token", json={"value": value}), 403)["detail"]
                problem(await other.get("/v1/secrets"), 403)
        refusals = [
            (await admin.put("/v1/secrets/token", json={"value": value, "environment": "nowhere"}), 422),
            (await admin.put("/v1/secrets/token", json={"value": value + "x" * 70_000}), 422),
            (await admin.put("/v1/secrets/token", json={"value": value + "\u0000"}), 422),
            (await admin.put("/v1/secrets/token", json={"value": 12345}), 422),
            (await admin.put("/v1/secrets/-bad-", json={"value": value}), 422),
            (
                await admin.put(
                    "/v1/secrets/token", content=f'{{"value": "{value}"', headers={"content-type": "application/json"}
                ),
                400,
            ),
        ]
        for response, status in refusals:
            assert value not in problem(response, status)["detail"], response.text
        assert "environment nowhere is not defined" in refusals[0][0].json()["detail"]
        assert await appended_since(stack, seq, org) == []
    async with stack.client("globex") as globex:
        listed = await globex.get("/v1/secrets")
        assert listed.status_code == 200 and org not in listed.text, "another org's admin sees none of them"


async def test_without_a_master_key_the_secrets_endpoints_answer_503_saying_how_to_set_one(stack: Stack) -> None:
    _org, keys = await new_org(stack)
    box, stack.services.secret_box = stack.services.secret_box, None
    try:
        async with client(stack, keys["admin"]) as admin, client(stack, keys["worker"]) as worker:
            for response in (
                await admin.put("/v1/secrets/token", json={"value": "v"}),
                await worker.post(f"/v1/tasks/{new_id()}/secrets/token", json={"worker_id": "w", "lease_id": "l"}),
            ):
                assert "CP_SECRETS_KEY" in problem(response, 503)["detail"]
    finally:
        stack.services.secret_box = box


async def test_only_the_worker_key_holding_the_lease_reads_and_each_read_is_audited(stack: Stack) -> None:
    org, keys = await new_org(stack)
    value, q = clear_value(), queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["worker"]) as worker:
        await put_secret(admin, "token", value)
        another = await admin.post("/v1/api-keys", json={"name": "second worker", "roles": ["worker"]})
        task_id, lease = await claimed(worker, admin, q)
        seq = (await admin.get(f"/v1/tasks/{task_id}")).json()["seq"]
        async with client(stack, another.json()["key"]) as second:
            refused = problem(await second.post(f"/v1/tasks/{task_id}/secrets/token", json=lease), 409)
            assert value not in refused["detail"]
        problem(await admin.post(f"/v1/tasks/{task_id}/secrets/token", json=lease), 403)  # not a worker key
        problem(await worker.post(f"/v1/tasks/{task_id}/secrets/token", json={**lease, "lease_id": "other"}), 409)
        missing = problem(await worker.post(f"/v1/tasks/{task_id}/secrets/nothing", json=lease), 404)
        assert "nothing" in missing["detail"] and "PUT /v1/secrets/nothing" in missing["detail"]
        problem(await worker.post(f"/v1/tasks/{new_id()}/secrets/token", json=lease), 404)
        problem(await worker.post(f"/v1/tasks/{task_id}/secrets/..%2Fx", json=lease), 404)
        assert await appended_since(stack, seq, org) == [], "refused reads record nothing"

        read = await worker.post(f"/v1/tasks/{task_id}/secrets/token", json=lease)
        assert read.status_code == 200, read.text
        assert {k: read.json()[k] for k in ("name", "version", "environment", "value")} == {
            "name": "token",
            "version": 1,
            "environment": None,
            "value": value,
        }
        [audit] = [r for r in await appended_since(stack, seq, org) if r.seq == read.json()["seq"]]
        assert isinstance(audit.event, SecretRead)
        assert (audit.event.name, audit.event.version, audit.event.worker_id, audit.event.lease_id) == (
            "token",
            1,
            "w1",
            lease["lease_id"],
        )
        assert audit.event.read_by == audit.actor and audit.actor.startswith("key:")
        assert audit.subject == aggregate_subject(org, "task", task_id), "the audit sits on the task it was read for"

        await worker.post(f"/v1/tasks/{task_id}/complete", json=lease)
        problem(await worker.post(f"/v1/tasks/{task_id}/secrets/token", json=lease), 409)  # the task ended


async def test_an_environment_version_wins_over_the_org_wide_one_and_never_reaches_other_tasks(stack: Stack) -> None:
    _org, keys = await new_org(stack)
    org_wide, in_eu, in_us = clear_value(), clear_value(), clear_value()
    eu_queue, us_queue, plain_queue = queue(), queue(), queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["worker"]) as worker:
        await admin.put("/v1/environments/eu", json={"queues": [eu_queue]})
        await admin.put("/v1/environments/us", json={"queues": [us_queue]})
        await put_secret(admin, "db", org_wide)
        await put_secret(admin, "db", in_eu, environment="eu")
        await put_secret(admin, "only-us", in_us, environment="us")

        async def read(q: str, name: str) -> httpx.Response:
            task_id, lease = await claimed(worker, admin, q)
            return await worker.post(f"/v1/tasks/{task_id}/secrets/{name}", json=lease)

        assert (await read(eu_queue, "db")).json()["value"] == in_eu
        assert (await read(plain_queue, "db")).json()["value"] == org_wide
        assert (await read(us_queue, "db")).json()["value"] == org_wide
        assert (await read(us_queue, "only-us")).json()["value"] == in_us
        for q in (eu_queue, plain_queue):
            refused = problem(await read(q, "only-us"), 404)
            assert in_us not in refused["detail"]


async def test_a_task_keeps_the_version_it_read_first_through_a_rotation_and_new_tasks_read_the_new_one(
    stack: Stack,
) -> None:
    _org, keys = await new_org(stack)
    old, new = clear_value(), clear_value()
    q = queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["worker"]) as worker:
        await put_secret(admin, "token", old)
        task_id, lease = await claimed(worker, admin, q)
        assert (await worker.post(f"/v1/tasks/{task_id}/secrets/token", json=lease)).json()["version"] == 1
        assert (await put_secret(admin, "token", new))["version"] == 2
        pinned = await worker.post(f"/v1/tasks/{task_id}/secrets/token", json=lease)
        assert (pinned.json()["version"], pinned.json()["value"]) == (1, old)
        later_id, later_lease = await claimed(worker, admin, q)
        rotated = await worker.post(f"/v1/tasks/{later_id}/secrets/token", json=later_lease)
        assert (rotated.json()["version"], rotated.json()["value"]) == (2, new)


async def test_a_master_key_rotation_keeps_old_versions_readable_and_a_rewrap_lets_the_old_key_go(
    stack: Stack,
) -> None:
    """The gateway restarted with a new ``CP_SECRETS_KEY`` and the old one in
    ``CP_SECRETS_PREVIOUS_KEYS``: a task pinned to a version sealed by the old key still reads it, and the
    next version is sealed by the new key. ``POST /v1/secrets/rewrap`` wraps the old version's data key,
    and a notification channel's sealed URL and secret, with the new key; then a gateway without the old
    key reads them too. A gateway holding neither answers
    503 naming the key a version needs, and its re-wrap lists what it could not open; never a value."""
    org, keys = await new_org(stack)
    old, new = clear_value(), clear_value()
    before = stack.services.secret_box
    assert before is not None
    new_key = base64.b64decode(generate_key_text())
    rotated = SecretBox(new_key, [base64.b64decode(stack.secrets_key)])
    hook = {"name": "hook", "kind": "webhook", "url": f"https://in.example.com/{old}", "secret": "whsec_c2VjcmV0"}
    async with client(stack, keys["admin"]) as admin, client(stack, keys["worker"]) as worker:
        await put_secret(admin, "token", old)
        assert (await admin.post("/v1/notification-channels", json=hook)).status_code == 201
        task_id, lease = await claimed(worker, admin, queue())

        async def read() -> httpx.Response:
            return await worker.post(f"/v1/tasks/{task_id}/secrets/token", json=lease)

        assert (await read()).json()["value"] == old
        try:
            stack.services.secret_box = rotated  # what a restart with the rotated environment builds
            pinned = await read()
            assert (pinned.json()["version"], pinned.json()["value"]) == (1, old)
            assert (await put_secret(admin, "token", new))["version"] == 2
            problem(await worker.post("/v1/secrets/rewrap"), 403)
            rewrapped = await admin.post("/v1/secrets/rewrap")
            assert rewrapped.status_code == 200, rewrapped.text
            assert rewrapped.json() == {
                "key_id": rotated.key_id,
                "rewrapped": [{"name": "token", "version": 1, "from_key_id": before.key_id}],
                "unreadable": [],
                "channels": {"rewrapped": [{"name": "hook", "fields": ["url", "secret"]}], "unreadable": []},
            }
            again = (await admin.post("/v1/secrets/rewrap")).json()
            assert again["rewrapped"] == again["channels"]["rewrapped"] == [], "nothing is left to move"
            history = await stack.services.store.read_subject(aggregate_subject(org, "secrets", "all"))
            assert [type(item.event).__name__ for item in history] == [
                "SecretVersionSet",
                "SecretVersionSet",
                "SecretVersionRewrapped",
            ]
            assert old.encode() not in b"".join(item.event.wrapped_key for item in history)

            stack.services.secret_box = retired = SecretBox(new_key)  # the old key retired
            assert (await read()).json()["value"] == old
            settings, _ = await stack.services.handler.load(org, "notifications", "all")
            url, secret = settings.channels["hook"].url, settings.channels["hook"].secret
            assert retired.open_text(org, "notification-channel/hook/url", url) == hook["url"]
            assert retired.open_text(org, "notification-channel/hook/secret", secret) == hook["secret"]

            stack.services.secret_box = SecretBox(base64.b64decode(generate_key_text()))  # the wrong key
            refused = problem(await read(), 503)
            assert rotated.key_id in refused["detail"] and old not in refused["detail"]
            stuck = (await admin.post("/v1/secrets/rewrap")).json()
            assert [(item["version"], rotated.key_id in item["reason"]) for item in stuck["unreadable"]] == [
                (1, True),
                (2, True),
            ]
            assert [item["name"] for item in stuck["channels"]["unreadable"]] == ["hook"]
            assert old not in str(stuck) and new not in str(stuck)
        finally:
            stack.services.secret_box = before


def deploy(*, idempotency_key: str) -> str:
    return "deployed"


@workflow("use-secret", version=1)
async def use_secret(ctx: WorkflowContext, payload: dict[str, Any]) -> dict[str, Any]:
    first = await ctx.secret(payload["name"])
    step = await ctx.step("deploy", deploy)
    await ctx.sleep(payload["sleep"])  # the next claim replays, and reads the secret again
    again = await ctx.secret(payload["name"])
    return {"sha256": hashlib.sha256(first.encode()).hexdigest(), "same": first == again, "step": step}


async def raw_log_bytes(stack: Stack, org: str) -> bytes:
    """Every message on the org's subjects as the stream stores it: headers and payload, undecoded."""
    nc = stack.services.store.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    chunks: list[bytes] = []
    try:
        request = json.dumps({"seq": 1, "next_by_subj": org_events_filter(org), "batch": 10_000}).encode()
        await nc.publish(f"$JS.API.DIRECT.GET.{stack.services.store.stream}", request, reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=5)
            if (msg.headers or {}).get("Status"):
                return b"".join(chunks)
            chunks += [json.dumps(msg.headers).encode(), msg.data]
    finally:
        await sub.unsubscribe()


def store_files(nats_server: EmbeddedNats) -> bytes:
    return b"".join(path.read_bytes() for path in (nats_server.data_dir / "jetstream").rglob("*") if path.is_file())


async def test_ctx_secret_in_a_real_workflow_returns_the_value_and_it_reaches_no_log_feed_export_or_log_line(
    stack: Stack, nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    org, keys = await new_org(stack)
    name, old, new, q = f"DEPLOY_TOKEN_{new_id()[-6:]}", clear_value(), clear_value(), queue()
    async with (
        client(stack, keys["admin"]) as admin,
        running(stack, Registry([use_secret]), q, worker_key=keys["worker"]),
    ):
        await put_secret(admin, name, old)
        submitted = await admin.post(
            "/v1/tasks",
            json={
                "type": "use-secret",
                "queue": q,
                "payload": {"name": name, "sleep": 1.0},
                "workflow": {"name": "use-secret", "version": 1},
            },
        )
        task_id = submitted.json()["id"]
        subject = aggregate_subject(org, "task", task_id)

        async def reads() -> list[SecretRead]:
            history = await stack.services.store.read_subject(subject)
            return [r.event for r in history if isinstance(r.event, SecretRead)]

        await until(lambda: _nonempty(reads()))
        await put_secret(admin, name, new)  # rotated while the task sleeps: it keeps version 1

        async def done() -> bool:
            return (await admin.get(f"/v1/tasks/{task_id}")).json()["status"] in ("completed", "failed")

        await until(done, within=30)
        task = await admin.get(f"/v1/tasks/{task_id}")
    assert task.json()["status"] == "completed", task.text
    assert task.json()["result"] == {
        "sha256": hashlib.sha256(old.encode()).hexdigest(),
        "same": True,
        "step": "deployed",
    }
    audited = await reads()
    assert len(audited) == 3, "one read before the sleep, the replay's and the one after it"
    assert {read.version for read in audited} == {1}, "the task's first read pinned version 1"
    assert [entry["kind"] for entry in task.json()["journal"]] == ["step", "sleep"], "reads are not journaled"

    # The value in clear is nowhere: not in the raw log, the stream's files, the SSE feed, an export, a log line.
    raw = await raw_log_bytes(stack, org)
    assert name.encode() in raw and b"SecretVersionSet" in raw, "the raw read sees the secret's events"
    files = b""
    async with asyncio.timeout(10):
        while name.encode() not in files:  # the server writes its blocks a moment after the ack
            await asyncio.sleep(0.1)
            files = store_files(nats_server)
    for value in (old, new):
        assert value.encode() not in raw
        assert value.encode() not in files
        assert value not in task.text

    events = await stack.services.store.read_subject(org_events_filter(org))
    async with client(stack, keys["viewer"]) as viewer, viewer.stream("GET", "/v1/events?after=0") as feed:
        sse = await asyncio.wait_for(_read_sse(feed, len(events)), 15)
    assert len(sse) == len(events)
    feed_text = json.dumps(sse)
    sets = [json.loads(item["data"]) for item in sse if item["event"] == "SecretVersionSet"]
    assert len(sets) == 2 and all(s["ciphertext"] == s["wrapped_key"] == s["nonce"] == REDACTED for s in sets)
    assert sum(item["event"] == "SecretRead" for item in sse) == 3

    exported = tmp_path / "export.jsonl"
    old_url = os.environ.get("CP_NATS_URL")
    os.environ["CP_NATS_URL"] = nats_server.url
    try:
        assert await asyncio.to_thread(main, ["export", org, "--output", str(exported)]) == 0
    finally:
        if old_url is None:
            os.environ.pop("CP_NATS_URL", None)
        else:
            os.environ["CP_NATS_URL"] = old_url
    export_text = exported.read_text()
    assert "SecretVersionSet" in export_text and "SecretRead" in export_text
    stored = [r for r in events if isinstance(r.event, SecretVersionSet)]
    for value in (old, new):
        assert value not in feed_text
        assert value not in export_text
        assert value not in caplog.text
    assert base64.b64encode(stored[0].event.ciphertext).decode() not in export_text, "not even the ciphertext"
    assert caplog.records, "the capture saw the gateway's and runner's lines"


async def _nonempty(pending: Any) -> bool:
    return bool(await pending)


async def test_the_cli_sets_secrets_from_a_file_or_stdin_lists_and_rewraps_them_and_configures_workers(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    org, keys = await new_org(stack)
    value, piped = clear_value(), clear_value()
    monkeypatch.setenv("CP_API_KEY", keys["admin"])
    value_file = tmp_path / "value"
    value_file.write_text(value + "\n")

    def cli(*argv: str) -> int:
        return main([*argv, "--url", stack.url])

    assert await asyncio.to_thread(cli, "secrets", "set", "token", "--value-file", str(value_file)) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(piped))
    assert await asyncio.to_thread(cli, "secrets", "set", "token", "--value-file", "-") == 0
    assert await asyncio.to_thread(cli, "secrets", "list") == 0
    assert await asyncio.to_thread(cli, "worker-config", "set", "--lease-seconds", "40", "--fallback", "m1") == 0
    assert await asyncio.to_thread(cli, "worker-config", "get") == 0
    out = capsys.readouterr().out
    assert "secret token (org-wide): version 1" in out and "secret token (org-wide): version 2" in out
    assert "version 2 (versions 1, 2)" in out
    assert '"lease_seconds": 40' in out and '"m1"' in out
    assert value not in out and piped not in out
    async with client(stack, keys["admin"]) as admin, client(stack, keys["worker"]) as worker:
        task_id, lease = await claimed(worker, admin, queue())
        read = await worker.post(f"/v1/tasks/{task_id}/secrets/token", json=lease)
        assert read.json()["value"] == piped, "the newest version: the one piped in"
    assert await asyncio.to_thread(cli, "secrets", "set", "token", "--value", value) == 2
    refused = capsys.readouterr()
    assert "--value is refused" in refused.err and value not in refused.err + refused.out
    async with client(stack, keys["admin"]) as admin:
        assert (await admin.get("/v1/secrets")).json()["items"][0]["versions"] == [1, 2], f"nothing set in {org}"
    assert await asyncio.to_thread(cli, "secrets", "rewrap") == 0  # nothing to move: one key all along
    assert "re-wrapped 0 version(s)" in capsys.readouterr().out
