"""Finding 11: the gateway connected as the superuser, so row-level security held only while every read
remembered ``SET LOCAL ROLE``. The gateway now logs in as ``cp_gateway``, which can only read (its own
org's rows, unless a read-only system view asks for all), and the projector as ``cp_projector``, which
writes rows but cannot change the schema. Every HTTP test in tests/gateway runs on these roles too."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import pytest

from projections.roles import GATEWAY_ROLE, PROJECTOR_ROLE, login_url
from projections.schema import SchemaBehind, migrate
from tests.gateway.conftest import Stack, own_database
from tests.security.test_lease_binding import security_stack

__all__ = ["security_stack"]

pytestmark = pytest.mark.integration


async def _submitted(stack: Stack) -> None:
    for org in ("acme", "globex"):
        async with stack.client(org, "submitter") as client:
            response = await client.post("/v1/tasks", json={"type": "roles-check", "payload": {}})
            assert response.status_code == 201, response.text
            # the read model has it once a list (which reads the submitter's own writes) shows it
            listed = await client.get("/v1/tasks", params={"min_seq": response.json()["seq"]})
            assert response.json()["id"] in [task["id"] for task in listed.json()["items"]]


async def test_the_gateway_login_sees_nothing_without_an_org_and_one_org_with_it(stack: Stack) -> None:
    await _submitted(stack)
    conn = await asyncpg.connect(stack.database_logins[GATEWAY_ROLE])
    try:
        assert await conn.fetchval("SELECT current_user") == GATEWAY_ROLE
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 0  # a read that forgets its org
        async with conn.transaction():
            await conn.execute("SELECT set_config('cp.org', 'acme', true)")
            orgs = {row["org_id"] for row in await conn.fetch("SELECT org_id FROM tasks")}
        assert orgs == {"acme"}
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO orgs (id, name, created_at) VALUES ('evil', 'evil', now())",
        "UPDATE tasks SET status = 'completed'",
        "DELETE FROM api_keys",
        "TRUNCATE tasks",
        "CREATE TABLE loot (id int)",
        "ALTER TABLE tasks DISABLE ROW LEVEL SECURITY",
        "DROP POLICY org_isolation ON tasks",
    ],
)
async def test_the_gateway_login_cannot_write_or_change_the_schema(stack: Stack, statement: str) -> None:
    conn = await asyncpg.connect(stack.database_logins[GATEWAY_ROLE])
    try:
        await conn.execute("SELECT set_config('cp.projector', 'on', false)")  # even claiming to be the projector
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "statement",
    ["CREATE TABLE loot (id int)", "ALTER TABLE tasks DISABLE ROW LEVEL SECURITY", "DROP TABLE checkpoints"],
)
async def test_the_projector_login_writes_rows_but_not_the_schema(stack: Stack, statement: str) -> None:
    conn = await asyncpg.connect(stack.database_logins[PROJECTOR_ROLE])
    try:
        assert await conn.fetchval("SELECT current_user") == PROJECTOR_ROLE
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_a_login_role_never_migrates_and_says_what_to_do(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.database_logins[GATEWAY_ROLE])
    try:
        assert await migrate(conn) == []  # the schema is current: nothing to do, nothing tried
        # Pretend a newer release added a migration the owner has not applied yet.
        owner = await asyncpg.connect(stack.database_logins["owner"])
        try:
            newest = await owner.fetchval(
                "DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)"
                " RETURNING version"
            )
            try:
                with pytest.raises(SchemaBehind, match="controlplane migrate"):
                    await migrate(conn)
            finally:
                await owner.execute("INSERT INTO schema_migrations VALUES ($1, now())", newest)
        finally:
            await owner.close()
    finally:
        await conn.close()


async def _controlplane(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane",
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_the_migrate_command_creates_the_login_roles(database_url: str) -> None:
    async with own_database(database_url, "migrate") as database:
        code, output = await _controlplane("migrate", "--login-roles", env={"DATABASE_URL": database})
        assert code == 2 and "CP_GATEWAY_DB_PASSWORD" in output, output
        passwords = {"CP_GATEWAY_DB_PASSWORD": "gateway-secret", "CP_PROJECTOR_DB_PASSWORD": "projector-secret"}
        code, output = await _controlplane("migrate", "--login-roles", env={"DATABASE_URL": database, **passwords})
        assert code == 0, output
        assert "gateway-secret" not in output and "projector-secret" not in output
        conn = await asyncpg.connect(login_url(database, GATEWAY_ROLE, "gateway-secret"))
        try:
            assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM api_keys")
        finally:
            await conn.close()
