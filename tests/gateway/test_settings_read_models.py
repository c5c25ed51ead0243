"""``GET /v1/queues``, ``GET /v1/worker-config`` and ``GET /v1/secrets`` over the real stack answer from
the read models: at once with the caller's own writes, with anyone's given ``?min_seq=``; and no
secret's value, nor any of its sealed text, ever reaches PostgreSQL."""

from __future__ import annotations

import base64

import asyncpg
import pytest

from core.domain.secrets import SECRETS_AGGREGATE, SECRETS_ID
from tests.gateway.conftest import Stack, new_org
from tests.gateway.test_api import queue
from tests.gateway.test_secrets import clear_value, client, put_secret

pytestmark = pytest.mark.integration


async def test_lists_show_the_callers_own_writes_at_once_and_anyones_with_min_seq(stack: Stack) -> None:
    _, keys = await new_org(stack)
    q = queue()
    async with client(stack, keys["admin"]) as admin, client(stack, keys["viewer"]) as viewer:
        assert (await admin.put("/v1/environments/eu", json={"queues": [q]})).status_code == 200
        configured = (await admin.put(f"/v1/queues/{q}", json={"strategy": "least_loaded"})).json()
        listed = (await admin.get("/v1/queues")).json()
        assert listed == {"items": [configured], "seq": configured["seq"]}
        assert (await viewer.get("/v1/queues", params={"min_seq": configured["seq"]})).json() == listed

        removed = (await admin.delete(f"/v1/queues/{q}")).json()
        assert (await admin.get("/v1/queues")).json() == {"items": [], "seq": removed["seq"]}

        org_wide = (await admin.put("/v1/worker-config", json={"lease_seconds": 30})).json()
        eu = (await admin.put("/v1/worker-config", params={"environment": "eu"}, json={"lease_seconds": 90})).json()
        assert (await admin.get("/v1/worker-config", params={"environment": "eu"})).json() == eu
        assert (await admin.get("/v1/worker-config")).json() == org_wide | {"seq": eu["seq"]}

        first = await put_secret(admin, "api-token", clear_value())
        second = await put_secret(admin, "api-token", clear_value(), environment="eu")
        secrets = (await admin.get("/v1/secrets")).json()
        assert secrets["seq"] == second["seq"]
        assert [(i["name"], i["environment"], i["versions"]) for i in secrets["items"]] == [
            ("api-token", None, [first["version"]]),
            ("api-token", "eu", [second["version"]]),
        ]


async def test_no_secret_value_nor_its_sealed_text_reaches_postgresql(stack: Stack) -> None:
    org, keys = await new_org(stack)
    values = [clear_value() for _ in range(3)]
    async with client(stack, keys["admin"]) as admin:
        assert (await admin.put("/v1/environments/prod", json={"queues": [queue()]})).status_code == 200
        await put_secret(admin, "DB_PASSWORD", values[0])
        await put_secret(admin, "DB_PASSWORD", values[1], environment="prod")
        await put_secret(admin, "SIGNING_KEY", values[2])
        listed = (await admin.get("/v1/secrets")).json()  # the read model holds every version now
    assert [i["name"] for i in listed["items"]] == ["DB_PASSWORD", "DB_PASSWORD", "SIGNING_KEY"]

    sealed, _ = await stack.services.handler.load(org, SECRETS_AGGREGATE, SECRETS_ID)
    versions = [found for name in sealed.by_name for found in sealed.by_name[name]]
    assert len(versions) == 3
    forbidden = list(values)
    for found in versions:
        for field in (found.wrapped_key, found.nonce, found.ciphertext):
            forbidden += [base64.b64encode(field).decode(), base64.urlsafe_b64encode(field).decode(), field.hex()]

    dump = await database_dump(stack.database_logins["owner"])
    assert "DB_PASSWORD,2,prod" in dump, "the dump holds the secrets' rows"
    leaked = [text for text in forbidden if text in dump]
    assert leaked == [], "a secret's value or sealed text is in PostgreSQL"


async def database_dump(database_url: str) -> str:
    """Every row of every table in the read model's database, as text, seen by its owner."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction(readonly=True):
            await conn.execute("SET LOCAL cp.projector = 'on'")  # every org's rows, whatever RLS says
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
            lines = [
                row["line"]
                for table in tables
                for row in await conn.fetch(f'SELECT t::text AS line FROM "{table["table_name"]}" t')
            ]
    finally:
        await conn.close()
    return "\n".join(lines)
