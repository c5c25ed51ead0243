"""Login roles with the least privilege each process needs, so row-level security does not depend on
every read remembering ``SET LOCAL ROLE``.

- The **owner** (whoever runs the migrations, a superuser in the dev stack) keeps DDL and is used only
  for ``migrate`` and :func:`provision_login_roles`.
- ``cp_projector`` writes the read model: DML on the projection tables and checkpoints, every org's rows
  when its transaction says ``cp.projector = on`` (as the owner's ``projector_writes`` policy allows the
  owner), and no DDL.
- ``cp_gateway`` reads: a member of ``cp_reader``, so an org-scoped read sees only the rows of the org
  its transaction names (``cp.org``) and a read that forgets it sees nothing. It may read across orgs
  only where the system needs it (the claim index's open tasks, the workers whose liveness timers
  matter), by saying ``cp.projector = on`` in a read-only transaction. It cannot write a row or change
  a table, whatever a bug in the gateway asks.

Roles belong to the PostgreSQL cluster, grants and policies to each database: provisioning is
idempotent and runs per database, under the migration lock."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote, urlsplit

import asyncpg

from projections.schema import MIGRATION_LOCK, ORG_SCOPED_TABLES, READER_ROLE

GATEWAY_ROLE = "cp_gateway"
PROJECTOR_ROLE = "cp_projector"
LOGIN_ROLES = (GATEWAY_ROLE, PROJECTOR_ROLE)
DB_PASSWORD_ENV = {GATEWAY_ROLE: "CP_GATEWAY_DB_PASSWORD", PROJECTOR_ROLE: "CP_PROJECTOR_DB_PASSWORD"}
"""Where ``controlplane migrate --login-roles`` finds each role's password."""
SYSTEM_TABLES = ("orgs", "api_keys", "checkpoints")
"""Tables that are not org-scoped: the org comes from a key, or the row is the system's own."""
_SYSTEM_SCOPE = "current_setting('cp.projector', true) = 'on'"


async def provision_login_roles(conn: asyncpg.Connection, passwords: Mapping[str, str]) -> None:
    """Create (or update the password of) ``cp_gateway`` and ``cp_projector`` and give each exactly its
    privileges on this database. Needs the owner of the tables with CREATEROLE (a superuser in dev)."""
    unknown = set(passwords) - set(LOGIN_ROLES)
    if unknown or not passwords:
        raise ValueError(f"give passwords for the login roles {', '.join(LOGIN_ROLES)}, not {sorted(unknown)}")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        schema = await conn.fetchval("SELECT current_schema()")
        for role, password in passwords.items():
            exists = await conn.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role)
            # A password is not an identifier or a parameter in DDL: quote it as a literal.
            literal = await conn.fetchval("SELECT quote_literal($1)", password)
            verb = "ALTER" if exists else "CREATE"
            await conn.execute(f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {literal}")
            await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        tables = ", ".join((*ORG_SCOPED_TABLES, *SYSTEM_TABLES))
        if GATEWAY_ROLE in passwords:
            await conn.execute(f"GRANT {READER_ROLE} TO {GATEWAY_ROLE}")
            await conn.execute(f"GRANT SELECT ON {tables}, schema_migrations TO {GATEWAY_ROLE}")
            await conn.execute(f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {tables} FROM {GATEWAY_ROLE}")
            await _policy(conn, "gateway_system_reads", GATEWAY_ROLE, "FOR SELECT", f"USING ({_SYSTEM_SCOPE})")
        if PROJECTOR_ROLE in passwords:
            await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {tables} TO {PROJECTOR_ROLE}")
            await conn.execute(f"GRANT SELECT ON schema_migrations TO {PROJECTOR_ROLE}")
            await conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {PROJECTOR_ROLE}")
            await _policy(
                conn,
                "projector_role_writes",
                PROJECTOR_ROLE,
                "",
                f"USING ({_SYSTEM_SCOPE}) WITH CHECK ({_SYSTEM_SCOPE})",
            )


async def _policy(conn: asyncpg.Connection, name: str, role: str, command: str, clauses: str) -> None:
    for table in ORG_SCOPED_TABLES:
        await conn.execute(f"DROP POLICY IF EXISTS {name} ON {table}")
        await conn.execute(f"CREATE POLICY {name} ON {table} {command} TO {role} {clauses}")


def login_url(database_url: str, role: str, password: str) -> str:
    """``database_url`` with ``role`` and ``password`` instead of its own user: same server, same
    database, same options (a unix-socket ``host=`` query included)."""
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{quote(role, safe='')}:{quote(password, safe='')}@{host}").geturl()
