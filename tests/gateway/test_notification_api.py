"""Notification channels and rules over HTTP: only an org's admin sees or changes them, bad input is a
422 that appends nothing, other orgs' are 404, secrets never come back, and a channel that rules send to
cannot be deleted. Each test seeds an org of its own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from core.domain.public import REDACTED
from core.domain.subjects import org_events_filter
from tests.gateway.conftest import Stack
from tests.gateway.test_api import _read_sse, last_seq, problem
from tests.gateway.test_environments import client, new_org

pytestmark = pytest.mark.integration

SLACK = {"name": "ops", "kind": "slack", "url": "https://hooks.example.com/services/T0/B0/slack-token"}
EMAIL = {
    "name": "mail",
    "kind": "email",
    "smtp": {
        "host": "smtp.example.com",
        "port": 587,
        "starttls": True,
        "username": "cp",
        "from": "cp@example.com",
        "to": ["ops@example.com", "oncall@example.com"],
    },
    "secret": "smtp-password",
}
HOOK = {
    "name": "hook",
    "kind": "webhook",
    "url": "https://user:pw@in.example.com:8443/cp?token=t",
    "secret": "whsec_c2VjcmV0",
}


async def channel(c: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, Any]:
    r = await c.post("/v1/notification-channels", json=spec)
    assert r.status_code == 201, r.text
    return r.json()


async def test_an_admin_defines_lists_and_deletes_channels_and_rules_and_secrets_never_come_back(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin:
        assert (await admin.get("/v1/notification-channels")).json() == {"items": [], "seq": 0}
        slack, mail, hook = [await channel(admin, spec) for spec in (SLACK, EMAIL, HOOK)]
        assert slack["endpoint"] == "https://hooks.example.com/…" and slack["secret_set"] is False
        assert mail["smtp"] == EMAIL["smtp"] and mail["secret_set"] is True and mail["endpoint"] is None
        assert hook["endpoint"] == "https://in.example.com:8443/…" and hook["secret_set"] is True
        assert hook["defined_by"].startswith("key:")
        listed = await admin.get("/v1/notification-channels")
        assert [item["name"] for item in listed.json()["items"]] == ["hook", "mail", "ops"]
        for secret in ("slack-token", "smtp-password", "c2VjcmV0", "pw@", "token=t"):
            assert secret not in listed.text
        assert (await admin.get("/v1/notification-channels/mail")).json()["smtp"]["to"] == EMAIL["smtp"]["to"]

        rule = await admin.post(
            "/v1/notification-rules",
            json={
                "id": "prod-approvals",
                "channel": "ops",
                "on": ["approval_requested", "approval_escalated"],
                "environment": "prod",
            },
        )
        assert rule.status_code == 201, rule.text
        assert {k: rule.json()[k] for k in ("id", "channel", "on", "queue", "environment", "workflow")} == {
            "id": "prod-approvals",
            "channel": "ops",
            "on": ["approval_requested", "approval_escalated"],
            "queue": None,
            "environment": "prod",
            "workflow": None,
        }
        generated = await admin.post("/v1/notification-rules", json={"channel": "mail", "on": ["task_failed"]})
        assert generated.status_code == 201 and generated.json()["id"]
        rules = (await admin.get("/v1/notification-rules")).json()
        assert {item["id"] for item in rules["items"]} == {"prod-approvals", generated.json()["id"]}

        in_use = problem(await admin.delete("/v1/notification-channels/ops"), 409)
        assert "prod-approvals" in in_use["detail"]
        assert (await admin.delete("/v1/notification-rules/prod-approvals")).status_code == 204
        problem(await admin.delete("/v1/notification-rules/prod-approvals"), 404)
        assert (await admin.delete("/v1/notification-channels/ops")).status_code == 204
        problem(await admin.get("/v1/notification-channels/ops"), 404)

        replaced = await admin.put("/v1/notification-channels/hook", json={**HOOK, "secret": "rotated"})
        assert replaced.status_code == 200 and replaced.json()["created_at"] == hook["created_at"]
        exists = problem(await admin.post("/v1/notification-channels", json=HOOK), 409)
        assert "PUT /v1/notification-channels/hook" in exists["detail"]

    # A viewer may follow the org's feed: it shows the channel with its URL and secret redacted.
    async with client(stack, keys["viewer"]) as viewer:
        params = {"types": "NotificationChannelDefined", "after": str(hook["seq"] - 1)}
        async with asyncio.timeout(15), viewer.stream("GET", "/v1/events", params=params) as response:
            [shown] = await _read_sse(response, 1)
    seen = json.loads(shown["data"])
    assert (seen["name"], seen["url"], seen["secret"]) == ("hook", REDACTED, REDACTED)
    assert org == seen["org"]


async def test_only_admins_see_or_change_notifications_and_refusals_append_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin:
        await channel(admin, SLACK)
    seq = await last_seq(stack)
    for role in ("submitter", "worker", "approver", "viewer"):
        async with client(stack, keys[role]) as other:
            problem(await other.post("/v1/notification-channels", json=EMAIL), 403)
            problem(await other.get("/v1/notification-channels"), 403)
            problem(await other.get("/v1/notification-channels/ops"), 403)
            problem(await other.put("/v1/notification-channels/ops", json=SLACK), 403)
            problem(await other.delete("/v1/notification-channels/ops"), 403)
            problem(await other.post("/v1/notification-rules", json={"channel": "ops", "on": ["task_failed"]}), 403)
            problem(await other.get("/v1/notification-rules"), 403)
            problem(await other.delete("/v1/notification-rules/r1"), 403)
    async with stack.client("globex") as globex:
        problem(await globex.get("/v1/notification-channels/ops"), 404)
        problem(await globex.delete("/v1/notification-channels/ops"), 404)
        assert "ops" not in [item["name"] for item in (await globex.get("/v1/notification-channels")).json()["items"]]
        refused = await globex.post("/v1/notification-rules", json={"channel": "ops", "on": ["task_failed"]})
        assert "not defined" in problem(refused, 422)["detail"], "another org's channel is not there"
    appended = await stack.services.store.read_subject(org_events_filter(org), after_seq=seq)
    assert appended == [], "a refused request appends nothing"


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "ops", "kind": "slack"},
        {"name": "ops", "kind": "slack", "url": "ftp://hooks.example.com/x"},
        {"name": "ops", "kind": "slack", "url": "https://hooks.example.com/x\n"},
        {"name": "ops", "kind": "slack", "url": "https://" + "h" * 2050},
        {"name": "ops", "kind": "slack", "url": "https://hooks.example.com/x", "secret": "s"},
        {"name": "ops", "kind": "pager", "url": "https://hooks.example.com/x"},
        {"name": "Ops", "kind": "slack", "url": "https://hooks.example.com/x"},
        {"name": "hook", "kind": "webhook", "url": "https://in.example.com/x"},
        {"name": "hook", "kind": "webhook", "url": "https://in.example.com/x", "secret": "whsec_!!"},
        {"name": "hook", "kind": "webhook", "url": "https://in.example.com/x", "secret": "two\nlines"},
        {"name": "mail", "kind": "email"},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "to": []}},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "to": ["not an address"]}},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "to": ["ops@example.com\r\nBcc: x@evil.example"]}},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "from": "cp@example.com\nBcc: x@evil.example"}},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "to": [f"u{n}@example.com" for n in range(51)]}},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "port": 0}},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "host": "smtp example com"}},
        {**EMAIL, "smtp": {**EMAIL["smtp"], "username": None}},
        {**EMAIL, "url": "https://in.example.com/x"},
    ],
)
async def test_a_bad_channel_is_422_and_appends_nothing(stack: Stack, bad: dict[str, Any]) -> None:
    org, keys = await new_org(stack)
    seq = await last_seq(stack)
    async with client(stack, keys["admin"]) as admin:
        problem(await admin.post("/v1/notification-channels", json=bad), 422)
    assert await stack.services.store.read_subject(org_events_filter(org), after_seq=seq) == []


async def test_a_bad_rule_is_422_and_appends_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin:
        await channel(admin, SLACK)
        seq = await last_seq(stack)
        for bad in (
            {"channel": "ops", "on": []},
            {"channel": "ops", "on": ["approval_requested", "approval_requested"]},
            {"channel": "ops", "on": ["task_succeeded"]},
            {"channel": "nowhere", "on": ["task_failed"]},
            {"channel": "ops", "on": ["task_failed"], "queue": "Not A Queue"},
            {"channel": "ops", "on": ["task_failed"], "environment": "prod\n"},
            {"channel": "ops", "on": ["task_failed"], "id": "Bad Id"},
            {"on": ["task_failed"]},
        ):
            problem(await admin.post("/v1/notification-rules", json=bad), 422)
        problem(await admin.put("/v1/notification-channels/Bad%0A", json=SLACK), 422)
        problem(await admin.post("/v1/notification-rules", content=b"{not json"), 400)
    assert await stack.services.store.read_subject(org_events_filter(org), after_seq=seq) == []


async def test_a_retried_create_answers_the_first_and_appends_nothing(stack: Stack) -> None:
    org, keys = await new_org(stack)
    async with client(stack, keys["admin"]) as admin:
        first = await admin.post("/v1/notification-channels", json=SLACK, headers={"Idempotency-Key": "c-1"})
        assert first.status_code == 201
        rule = {"channel": "ops", "on": ["task_parked"]}
        made = await admin.post("/v1/notification-rules", json=rule, headers={"Idempotency-Key": "r-1"})
        assert made.status_code == 201
        seq = await last_seq(stack)
        again = await admin.post("/v1/notification-channels", json=SLACK, headers={"Idempotency-Key": "c-1"})
        assert (again.status_code, again.json()) == (201, first.json())
        retried = await admin.post("/v1/notification-rules", json=rule, headers={"Idempotency-Key": "r-1"})
        assert (retried.status_code, retried.json()) == (201, made.json())
        assert await stack.services.store.read_subject(org_events_filter(org), after_seq=seq) == []
        other = {"channel": "ops", "on": ["task_failed"]}
        problem(await admin.post("/v1/notification-rules", json=other, headers={"Idempotency-Key": "r-1"}), 409)
