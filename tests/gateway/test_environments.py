"""Environments over HTTP: an org's admin names the queues each environment holds (a queue in at most
one), a task's environment is its queue's as the server says, and a submit may name an environment
instead of a queue. Each test seeds an org of its own, so environment names never collide."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from controlplane.cli import main
from core.domain.ids import new_id
from core.domain.subjects import org_events_filter
from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import appended_since, last_seq, problem, queue

pytestmark = pytest.mark.integration


def client(stack: Stack, key: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}", **headers}, timeout=20)


async def define(c: httpx.AsyncClient, name: str, queues: list[str], **fields: Any) -> dict[str, Any]:
    r = await c.post("/v1/environments", json={"name": name, "queues": queues, **fields})
    assert r.status_code == 201, r.text
    return r.json()


async def test_an_admin_creates_lists_gets_replaces_and_deletes_environments(stack: Stack) -> None:
    _, keys = await new_org(stack)
    q1, q2, q3 = queue(), queue(), queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["viewer"]) as viewer:
        assert (await viewer.get("/v1/environments")).json() == {"items": [], "seq": 0}
        prod = await define(admin, "prod", [q1, q2], labels={"tier": "critical"})
        assert {k: prod[k] for k in ("name", "queues", "labels")} == {
            "name": "prod",
            "queues": [q1, q2],
            "labels": {"tier": "critical"},
        }
        assert prod["created_at"] == prod["updated_at"] and prod["seq"] > 0
        assert prod["defined_by"].startswith("key:")
        staging = await define(admin, "staging", [q3])

        listed = (await viewer.get("/v1/environments")).json()
        assert [item["name"] for item in listed["items"]] == ["prod", "staging"]
        assert listed["seq"] == staging["seq"], "reads show every write before them"
        got = await viewer.get("/v1/environments/prod")
        assert got.status_code == 200 and got.json()["queues"] == [q1, q2]
        problem(await viewer.get("/v1/environments/nowhere"), 404)
        problem(await viewer.get("/v1/environments/Not%20A%20Name"), 404)

        exists = problem(await admin.post("/v1/environments", json={"name": "prod", "queues": [q1]}), 409)
        assert "already exists" in exists["detail"] and "PUT /v1/environments/prod" in exists["detail"]

        replaced = await admin.put("/v1/environments/prod", json={"queues": [q2], "labels": {}})
        assert replaced.status_code == 200, replaced.text
        assert (replaced.json()["queues"], replaced.json()["labels"]) == ([q2], {})
        assert replaced.json()["created_at"] == prod["created_at"] and replaced.json()["seq"] > staging["seq"]
        created = await admin.put("/v1/environments/dev", json={"queues": [q1]})  # q1 was freed just above
        assert created.status_code == 200 and created.json()["queues"] == [q1]

        deleted = await admin.delete("/v1/environments/staging")
        assert deleted.status_code == 204
        problem(await viewer.get("/v1/environments/staging"), 404)
        problem(await admin.delete("/v1/environments/staging"), 404)
        assert [item["name"] for item in (await viewer.get("/v1/environments")).json()["items"]] == ["dev", "prod"]
        await define(admin, "qa", [q3])  # a deleted environment's queues belong to none


async def test_only_admins_change_environments_and_other_orgs_see_none_of_them(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        await define(admin, "prod", [q])
    seq = await last_seq(stack)
    for role in ("submitter", "worker", "approver", "viewer"):
        async with client(stack, keys[role]) as other:
            problem(await other.post("/v1/environments", json={"name": "mine", "queues": [queue()]}), 403)
            problem(await other.put("/v1/environments/prod", json={"queues": []}), 403)
            problem(await other.delete("/v1/environments/prod"), 403)
            assert (await other.get("/v1/environments/prod")).status_code == 200
    # This org's subjects only: other tests' timers fire on the shared stream meanwhile.
    appended = await stack.services.store.read_subject(org_events_filter(org), after_seq=seq)
    assert appended == [], "a refused request appends nothing"
    async with stack.client("globex") as globex:
        problem(await globex.get("/v1/environments/prod"), 404)
        problem(await globex.delete("/v1/environments/prod"), 404)
        assert "prod" not in [item["name"] for item in (await globex.get("/v1/environments")).json()["items"]]
        await define(globex, f"prod{new_id()[-6:]}", [q])  # queues are per org: globex's q is another queue


async def test_a_queue_belongs_to_at_most_one_environment_and_bad_input_appends_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q1, q2 = queue(), queue()
    async with client(stack, keys["admin"]) as admin:
        await define(admin, "prod", [q1])
        await define(admin, "dev", [q2])
        seq = await last_seq(stack)
        taken = problem(await admin.post("/v1/environments", json={"name": "qa", "queues": [q2, q1]}), 409)
        assert f"queue {q2} belongs to environment dev" in taken["detail"]
        taken = problem(await admin.put("/v1/environments/dev", json={"queues": [q2, q1]}), 409)
        assert f"queue {q1} belongs to environment prod" in taken["detail"]
        twice = problem(await admin.post("/v1/environments", json={"name": "qa", "queues": [q1 + "x", q1 + "x"]}), 422)
        assert "listed twice" in twice["detail"]
        for bad in (
            {"name": "prod\n", "queues": []},
            {"name": "Prod"},
            {"name": "p" * 64},
            {"name": "", "queues": []},
            {"queues": []},
            {"name": "qa", "queues": ["Bad Queue"]},
            {"name": "qa", "queues": "q1"},
            {"name": "qa", "labels": {"tier": 1}},
            {"name": "qa", "labels": {"": "x"}},
            {"name": "qa", "queues": [f"q{n}" for n in range(101)]},
        ):
            problem(await admin.post("/v1/environments", json=bad), 422)
        problem(await admin.put("/v1/environments/Bad%0A", json={"queues": []}), 422)
        problem(await admin.put("/v1/environments/prod", json={"queues": ["q\n"]}), 422)
        problem(await admin.post("/v1/environments", content=b"{not json"), 400)
        problem(await admin.post("/v1/environments", content=b"[]"), 400)
        assert await appended_since(stack, seq, org) == [], "nothing refused was appended"
        assert (await admin.get("/v1/environments/dev")).json()["queues"] == [q2]


async def test_a_retried_create_returns_the_first_answer_and_appends_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin:
        body = {"name": "prod", "queues": [q]}
        first = await admin.post("/v1/environments", json=body, headers={"Idempotency-Key": "env-1"})
        assert first.status_code == 201, first.text
        seq = await last_seq(stack)
        again = await admin.post("/v1/environments", json=body, headers={"Idempotency-Key": "env-1"})
        assert (again.status_code, again.json()) == (201, first.json())
        assert await appended_since(stack, seq, org) == [], "a retry appends nothing"
        problem(await admin.post("/v1/environments", json=body, headers={"Idempotency-Key": "env-2"}), 409)
        deleted = await admin.delete("/v1/environments/prod", headers={"Idempotency-Key": "del-1"})
        assert deleted.status_code == 204
        seq = await last_seq(stack)
        assert (await admin.delete("/v1/environments/prod", headers={"Idempotency-Key": "del-1"})).status_code == 204
        assert await appended_since(stack, seq, org) == []


async def test_a_task_takes_its_queues_environment_and_a_submit_may_name_the_environment(stack: Stack) -> None:
    org, keys = await new_org(stack)
    deploys, canary, scratch, loose = queue(), queue(), queue(), queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["submitter"]) as submitter:
        await define(admin, "staging", [deploys, canary])
        await define(admin, "dev", [scratch])
        await define(admin, "empty", [])

        on_queue = await submitter.post("/v1/tasks", json={"type": "deploy", "queue": canary})
        assert on_queue.status_code == 201, on_queue.text
        assert (on_queue.json()["queue"], on_queue.json()["environment"]) == (canary, "staging")
        shown = (await submitter.get(f"/v1/tasks/{on_queue.json()['id']}")).json()
        assert shown["environment"] == "staging"
        elsewhere = (await submitter.post("/v1/tasks", json={"type": "deploy", "queue": loose})).json()
        assert elsewhere["environment"] is None, "a queue no environment holds has none"
        declared = await submitter.post(
            "/v1/tasks", json={"type": "deploy", "queue": loose, "metadata": {"environment": "staging"}}
        )
        assert declared.json()["environment"] is None and declared.json()["metadata"] == {"environment": "staging"}

        routed = await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "staging"})
        assert routed.status_code == 201, routed.text
        assert (routed.json()["queue"], routed.json()["environment"]) == (deploys, "staging"), "its first queue"
        both = await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "staging", "queue": canary})
        assert (both.json()["queue"], both.json()["environment"]) == (canary, "staging")

        seq = await last_seq(stack)
        disagree = problem(
            await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "dev", "queue": canary}), 422
        )
        assert f"queue {canary} is not in environment dev" in disagree["detail"]
        unknown = problem(await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "nowhere"}), 422)
        assert "environment nowhere is not defined" in unknown["detail"]
        empty = problem(await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "empty"}), 422)
        assert "holds no queue" in empty["detail"]
        problem(await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "Dev\n"}), 422)
        assert await appended_since(stack, seq, org) == [], "a submit refused for its environment appends nothing"

        await admin.put("/v1/environments/staging", json={"queues": [canary]})
        moved = (await submitter.post("/v1/tasks", json={"type": "deploy", "environment": "staging"})).json()
        assert moved["queue"] == canary, "routing follows the environment at once"
        assert (await submitter.get(f"/v1/tasks/{routed.json()['id']}")).json()["environment"] == "staging"
        listed = await submitter.get("/v1/tasks", params={"queue": canary, "min_seq": moved["seq"]})
        assert {t["environment"] for t in listed.json()["items"]} == {"staging"}, "the read model shows it too"


async def test_the_read_model_holds_each_orgs_environments_as_the_log_does(stack: Stack) -> None:
    org, keys = await new_org(stack)
    q1, q2 = queue(), queue()
    read_model = stack.services.read_model
    async with client(stack, keys["admin"]) as admin:
        await define(admin, "prod", [q1, q2], labels={"region": "eu"})
        await define(admin, "dev", [])
        await admin.delete("/v1/environments/dev")
        last = (await admin.put("/v1/environments/prod", json={"queues": [q2, q1]})).json()
        assert await read_model.wait_for("environments", last["seq"], timeout=10)
        [(projected, seq)] = await read_model.list_environments(org)
        served = (await admin.get("/v1/environments/prod")).json()
        assert (projected.name, list(projected.queues), projected.labels, seq) == ("prod", [q2, q1], {}, last["seq"])
        assert (projected.created_at.isoformat(), projected.updated_at.isoformat()) == (
            served["created_at"].replace("Z", "+00:00"),
            served["updated_at"].replace("Z", "+00:00"),
        )
        assert await read_model.get_environment(org, "dev") is None
        assert await read_model.environment_of_queue(org, q1) == "prod"
        assert await read_model.environment_of_queue("globex", q1) is None
        assert [env.name for env, _ in await read_model.list_environments(org)] == ["prod"]


async def test_the_cli_lists_creates_replaces_and_deletes_environments(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, keys = await new_org(stack)
    q1, q2 = queue(), queue()
    monkeypatch.setenv("CP_API_KEY", keys["admin"])

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["environments", *argv, "--url", stack.url])
        out, err = capsys.readouterr()
        return code, out, err

    assert (await cli("list"))[:2] == (0, "no environments: every task's environment is none\n")
    code, out, _ = await cli("create", "prod", "--queue", q1, "--queue", q2, "--label", "tier=critical")
    assert code == 0 and f"environment prod: queues {q1}, {q2}" in out
    with pytest.raises(SystemExit) as refused:
        await cli("create", "prod", "--queue", q1)
    assert refused.value.code == 1 and "already exists" in capsys.readouterr().err
    code, out, _ = await cli("create", "prod", "--queue", q2, "--replace")
    assert code == 0 and f"queues {q2} " in out
    code, out, _ = await cli("list")
    assert out.split() == ["prod", q2, "tier=critical"] or out.split()[:2] == ["prod", q2]
    assert (await cli("delete", "prod"))[:2] == (0, "environment prod deleted\n")
    monkeypatch.setenv("CP_API_KEY", keys["viewer"])
    with pytest.raises(SystemExit) as forbidden:
        await cli("create", "qa")
    assert forbidden.value.code == 1 and "403" in capsys.readouterr().err
