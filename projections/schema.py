"""The read model's tables, as versioned migrations applied at start.

Migrations are append-only: a released migration is never edited, a change is a new version. Each
runs in its own transaction under a transaction-scoped advisory lock, so several processes starting
at once (gateways, projector, CLI) serialize instead of racing on ``CREATE TABLE``; the loser finds
the version recorded and skips it.

Row-level security is a second wall behind the gateway's own org checks. Org-scoped tables are
``ENABLE`` + ``FORCE ROW LEVEL SECURITY`` with two permissive policies:

- ``org_isolation``: a row is visible when its ``org_id`` equals the transaction's ``cp.org`` setting.
  Readers run as the NOLOGIN role ``cp_reader`` (``SET LOCAL ROLE`` inside their transaction, because
  superusers bypass RLS) and set ``cp.org``; a query that forgets its org filter then still sees one
  org only.
- ``projector_writes``: the role that ran the migration (the tables' owner) sees and writes every
  row when its session says ``cp.projector = on``. FORCE subjects the owner to RLS too, so without
  this policy a non-superuser projector could not write a batch that spans orgs.

Checkpoint rows are keyed by projection name, or ``<projection>@<index>/<count>`` per shard when a
projection runs sharded by org (:class:`Shard`); :func:`effective_checkpoints` turns rows into what
readers wait on.

Creating ``cp_reader`` needs CREATEROLE. Without it (and without an existing role) ``migrate`` logs a
warning and goes on: readers then run as the connected user and the org walls are the gateway's
explicit ``org_id`` filters, plus RLS itself when that user is a non-superuser owner (FORCE applies)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg
import msgspec

log = logging.getLogger(__name__)

READER_ROLE = "cp_reader"
NOTIFY_CHANNEL = "cp_checkpoint"
"""``pg_notify`` channel; the payload is ``<checkpoint key>,<checkpoint key>…:<checkpoint seq>``: one
notification per commit, for every checkpoint row it moved (all to the same sequence)."""

_FIRST_ORG_SCOPED_TABLES = ("tasks", "approvals", "workers", "worker_counters", "usage")
ORG_SCOPED_TABLES = (
    *_FIRST_ORG_SCOPED_TABLES,
    "usage_tasks",
    "environments",
    "schedules",
    "queue_settings",
    "worker_config",
    "secrets",
)
MIGRATION_LOCK = 0x63705F6D6967  # "cp_mig": one advisory lock id for every migrating process


class Migration(msgspec.Struct, frozen=True):
    version: int
    description: str
    sql: str


def _row_level_security(tables: Sequence[str]) -> str:
    return "\n".join(
        f"""
        ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
        CREATE POLICY org_isolation ON {table} USING (org_id = current_setting('cp.org', true));
        CREATE POLICY projector_writes ON {table} TO CURRENT_USER
            USING (current_setting('cp.projector', true) = 'on')
            WITH CHECK (current_setting('cp.projector', true) = 'on');"""
        for table in tables
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tasks, approvals, workers, usage, orgs, api keys, checkpoints; row-level security",
        """
        CREATE TABLE tasks (
            org_id text NOT NULL,
            id text NOT NULL,
            queue text NOT NULL,
            status text NOT NULL,
            priority text NOT NULL,
            priority_rank smallint NOT NULL,
            required_capabilities text[] NOT NULL,
            workflow_name text,
            workflow_version int,
            assigned_worker text,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            not_before timestamptz,
            state jsonb NOT NULL,
            seq bigint NOT NULL,
            PRIMARY KEY (org_id, id)
        );
        CREATE INDEX tasks_claim ON tasks (org_id, queue, status, priority_rank, created_at, id);
        CREATE INDEX tasks_listing ON tasks (org_id, created_at, id);
        CREATE INDEX tasks_listing_by_status ON tasks (org_id, status, created_at, id);

        CREATE TABLE approvals (
            org_id text NOT NULL,
            id text NOT NULL,
            task_id text NOT NULL,
            status text NOT NULL,
            created_at timestamptz NOT NULL,
            expires_at timestamptz,
            decided_at timestamptz,
            state jsonb NOT NULL,
            seq bigint NOT NULL,
            PRIMARY KEY (org_id, id)
        );
        CREATE INDEX approvals_inbox ON approvals (org_id, status, created_at, id);
        CREATE INDEX approvals_by_task ON approvals (org_id, task_id);

        CREATE TABLE workers (
            org_id text NOT NULL,
            id text NOT NULL,
            queue text NOT NULL,
            capabilities text[] NOT NULL,
            status text NOT NULL,
            last_heartbeat_at timestamptz NOT NULL,
            tasks_completed int NOT NULL DEFAULT 0,
            state jsonb NOT NULL,
            seq bigint NOT NULL,
            PRIMARY KEY (org_id, id)
        );

        -- Completions per worker id, kept apart from ``workers`` because a deregistered worker's row
        -- is deleted and a re-registration must find its count again.
        CREATE TABLE worker_counters (
            org_id text NOT NULL,
            worker_id text NOT NULL,
            tasks_completed int NOT NULL,
            PRIMARY KEY (org_id, worker_id)
        );

        CREATE TABLE usage (
            org_id text NOT NULL,
            day date NOT NULL,
            model text NOT NULL,
            provider text NOT NULL,
            calls int NOT NULL,
            prompt_tokens bigint NOT NULL,
            completion_tokens bigint NOT NULL,
            cost_usd numeric(18, 8) NOT NULL,
            PRIMARY KEY (org_id, day, model)
        );

        CREATE TABLE orgs (
            id text PRIMARY KEY,
            name text NOT NULL,
            created_at timestamptz NOT NULL
        );

        CREATE TABLE api_keys (
            id text PRIMARY KEY,
            org_id text NOT NULL,
            name text NOT NULL,
            roles text[] NOT NULL,
            secret_sha256 text NOT NULL,
            created_by text NOT NULL,
            created_at timestamptz NOT NULL,
            revoked_at timestamptz
        );
        CREATE INDEX api_keys_by_org ON api_keys (org_id);

        CREATE TABLE checkpoints (
            projection text PRIMARY KEY,
            seq bigint NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        """
        + _row_level_security(_FIRST_ORG_SCOPED_TABLES),
    ),
    # A read model is dropped and refolded rather than converted: deleting the projection's checkpoint
    # rows (its own and any shard's) makes the next projector fold the whole log into it again.
    Migration(
        2,
        "usage per queue and workflow too; usage_tasks (each task's queue and workflow, for the usage fold)",
        """
        DROP TABLE usage;
        CREATE TABLE usage (
            org_id text NOT NULL,
            day date NOT NULL,
            model text NOT NULL,
            queue text NOT NULL,
            workflow text NOT NULL,  -- the task's workflow name; '' for a task that runs none
            provider text NOT NULL,
            calls int NOT NULL,
            prompt_tokens bigint NOT NULL,
            completion_tokens bigint NOT NULL,
            cost_usd numeric(18, 8) NOT NULL,
            PRIMARY KEY (org_id, day, model, queue, workflow)
        );

        -- What the usage projection learns from TaskSubmitted: LLM calls are recorded on the task's
        -- subject without its queue or workflow. Owned by the usage projection (not read from
        -- ``tasks``, which another projection writes at its own pace), so it folds the same live and
        -- in a rebuild.
        CREATE TABLE usage_tasks (
            org_id text NOT NULL,
            task_id text NOT NULL,
            queue text NOT NULL,
            workflow text NOT NULL,
            PRIMARY KEY (org_id, task_id)
        );

        DELETE FROM checkpoints WHERE projection = 'usage' OR projection LIKE 'usage@%';
        """
        + _row_level_security(("usage", "usage_tasks")),
    ),
    Migration(
        4,
        "environments: each org's environments and the queues each holds (the environments projection)",
        """
        CREATE TABLE environments (
            org_id text NOT NULL,
            name text NOT NULL,
            queues text[] NOT NULL,  -- in order: the first is where a submit naming the environment goes
            labels jsonb NOT NULL,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            defined_by text NOT NULL,
            seq bigint NOT NULL,  -- of the org's environments' last event folded
            PRIMARY KEY (org_id, name)
        );
        """
        + _row_level_security(("environments",)),
    ),
    Migration(
        5,
        "tasks_open: the open tasks indexed apart, for the operator metrics' per-scrape queue summary",
        """
        -- The predicate is the open statuses spelled out: queries that want the index say the same.
        CREATE INDEX tasks_open ON tasks (org_id, queue) WHERE status IN ('pending', 'running', 'awaiting_approval');
        """,
    ),
    Migration(
        6,
        "schedules: each schedule (cron) of each org (the schedules projection)",
        """
        CREATE TABLE schedules (
            org_id text NOT NULL,
            id text NOT NULL,
            cron text NOT NULL,
            timezone text NOT NULL,
            overlap text NOT NULL,
            paused boolean NOT NULL,
            deleted boolean NOT NULL,  -- kept, so a schedule created again under the id folds on from it
            next_fire_at timestamptz,
            last_task_id text,
            created_at timestamptz NOT NULL,
            state jsonb NOT NULL,
            seq bigint NOT NULL,
            PRIMARY KEY (org_id, id)
        );
        CREATE INDEX schedules_listing ON schedules (org_id, created_at, id) WHERE NOT deleted;
        """
        + _row_level_security(("schedules",)),
    ),
    # A row for the whole org has '' (projections.folds.tables.ORG_WIDE) as its environment or queue,
    # not NULL: those columns are part of the keys.
    Migration(
        7,
        "queue_settings, worker_config, secrets: each org's queue settings, worker configuration and secrets"
        " (never a secret's value, sealed or not)",
        """
        CREATE TABLE queue_settings (
            org_id text NOT NULL,
            queue text NOT NULL,
            strategy text NOT NULL,
            breaker_failures int NOT NULL,
            breaker_cooldown_seconds float8 NOT NULL,
            configured boolean NOT NULL,  -- false on the org's row (queue ''): the defaults of the others
            updated_at timestamptz,
            configured_by text,
            seq bigint NOT NULL,  -- of the org's queue settings' last event folded
            PRIMARY KEY (org_id, queue)
        );

        CREATE TABLE worker_config (
            org_id text NOT NULL,
            environment text NOT NULL,  -- '' for the org's own configuration
            settings jsonb NOT NULL,  -- as set for this scope alone (null: not set), without inheritance
            seq bigint NOT NULL,  -- of the org's worker configuration's last event folded
            PRIMARY KEY (org_id, environment)
        );

        -- A row per version: who set it when, and for which scope. No value, ciphertext or key.
        CREATE TABLE secrets (
            org_id text NOT NULL,
            name text NOT NULL,
            version int NOT NULL,
            environment text NOT NULL,  -- '' for an org-wide version
            set_at timestamptz NOT NULL,
            set_by text NOT NULL,
            seq bigint NOT NULL,  -- of the org's secrets' last event folded
            PRIMARY KEY (org_id, name, version)
        );
        """
        + _row_level_security(("queue_settings", "worker_config", "secrets")),
    ),
)


async def migrate(target: asyncpg.Pool | asyncpg.Connection) -> list[int]:
    """Apply the migrations this database lacks, then make sure ``cp_reader`` can read; returns the
    versions applied now. Safe to call from every process at every start."""
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as conn:
            return await migrate(conn)
    if not await _may_migrate(target):
        await _require_current_schema(target)
        return []
    # One session lock around them all: concurrent migrators then never split the versions between
    # them (each migration still commits on its own, so a failed one keeps the ones before).
    await target.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        return await _apply_migrations(target)
    finally:
        await target.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def _apply_migrations(target: asyncpg.Connection) -> list[int]:
    applied: list[int] = []
    for migration in MIGRATIONS:
        async with target.transaction():
            await target.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version int PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            if await target.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", migration.version):
                continue
            await target.execute(migration.sql)
            await target.execute("INSERT INTO schema_migrations VALUES ($1, now())", migration.version)
            log.info("applied migration %d: %s", migration.version, migration.description)
            applied.append(migration.version)
    async with target.transaction():
        await _grant_reader(target)
    return applied


class SchemaBehind(RuntimeError):
    """The database lacks migrations and the connected role may not apply them."""


async def _may_migrate(conn: asyncpg.Connection) -> bool:
    """A superuser, or a member of the role that owns the schema's tables (or, on a fresh database,
    anyone: whoever creates the tables owns them). The login roles of ``projections.roles`` are none."""
    superuser, owner = await conn.fetchrow(
        "SELECT r.rolsuper, t.tableowner FROM pg_roles r LEFT JOIN pg_tables t"
        " ON t.tablename = 'schema_migrations' AND t.schemaname = current_schema() WHERE r.rolname = current_user"
    )
    if superuser or owner is None:
        return True
    return bool(await conn.fetchval("SELECT pg_has_role(current_user, $1, 'USAGE')", owner))


async def _require_current_schema(conn: asyncpg.Connection) -> None:
    applied = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    missing = [migration.version for migration in MIGRATIONS if migration.version not in applied]
    if missing:
        raise SchemaBehind(
            f"the read model's database lacks migrations {missing}, and {await conn.fetchval('SELECT current_user')} "
            "may not change the schema: run `controlplane migrate` with the owner's DATABASE_URL first"
        )


async def _grant_reader(conn: asyncpg.Connection) -> None:
    """Create ``cp_reader`` if missing and grant it SELECT on the org-scoped tables. Roles are
    cluster-wide, so another database's migration may create it concurrently: that is fine."""
    superuser, may_create, exists = await conn.fetchrow(
        "SELECT rolsuper, rolsuper OR rolcreaterole, EXISTS (SELECT FROM pg_roles WHERE rolname = $1)"
        " FROM pg_roles WHERE rolname = current_user",
        READER_ROLE,
    )
    if not exists and not may_create:
        log.warning(
            "role %s does not exist and %s may not create it (no CREATEROLE): readers run without it, so the "
            "org walls are the gateway's explicit org filters (and RLS when connected as a non-superuser owner)",
            READER_ROLE,
            await conn.fetchval("SELECT current_user"),
        )
        return
    if not exists:
        try:
            async with conn.transaction():
                await conn.execute(f"CREATE ROLE {READER_ROLE} NOLOGIN")
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            pass  # created meanwhile by a migration of another database in this cluster
    await conn.execute(
        f"GRANT USAGE ON SCHEMA {await conn.fetchval('SELECT current_schema()')} TO {READER_ROLE};"
        f"GRANT SELECT ON {', '.join(ORG_SCOPED_TABLES)} TO {READER_ROLE}"
    )
    if not superuser:
        # PostgreSQL 16 gives a role's creator ADMIN but not SET; readers need SET ROLE.
        try:
            async with conn.transaction():
                await conn.execute(f"GRANT {READER_ROLE} TO CURRENT_USER")
        except asyncpg.InsufficientPrivilegeError:
            log.warning("cannot grant %s to the current user: readers will run without it", READER_ROLE)
