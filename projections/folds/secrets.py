"""The ``secrets`` projection: a row per version of each org's secrets (one aggregate per org,
``cp.<org>.secrets.all``): its name, scope, and who set it when.

Never a value, sealed or not: neither the ciphertext, its nonce, the wrapped data key nor the master
key's id reaches PostgreSQL. The states loaded back to fold on hold versions with those fields
empty; folding needs only each name's versions (a version is taken when it is the next of its
name), and no reader of this table opens a value: a task's read of a secret goes to the log."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from core.domain.secrets import SECRETS, SECRETS_AGGREGATE, SealedVersion, Secrets
from projections.folds.projection import StateProjection
from projections.folds.rows import Upsert
from projections.folds.tables import ORG_WIDE, OrgRowsTable


def secrets_from_rows(rows: Sequence[asyncpg.Record]) -> Secrets:
    """An org's secrets from its rows (ordered by name and version), every sealed field empty."""
    by_name: dict[str, list[SealedVersion]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(
            SealedVersion(
                name=row["name"],
                version=row["version"],
                environment=row["environment"] or None,
                key_id="",
                wrapped_key=b"",
                nonce=b"",
                ciphertext=b"",
                set_at=row["set_at"],
                set_by=row["set_by"],
            )
        )
    return Secrets(by_name={name: tuple(versions) for name, versions in by_name.items()})


class SecretTable(OrgRowsTable[Secrets]):
    decider = SECRETS
    upsert = Upsert(
        "secrets",
        key=("org_id", "name", "version"),
        columns=(
            ("org_id", "text"),
            ("name", "text"),
            ("version", "int"),
            ("environment", "text"),
            ("set_at", "timestamptz"),
            ("set_by", "text"),
            ("seq", "bigint"),
        ),
    )

    def state_of(self, rows: Sequence[asyncpg.Record]) -> Secrets:
        return secrets_from_rows(rows)

    def rows_of(self, state: Secrets) -> Iterable[tuple[Any, ...]]:
        return (
            (found.name, found.version, found.environment or ORG_WIDE, found.set_at, found.set_by)
            for versions in state.by_name.values()
            for found in versions
        )


PROJECTION = StateProjection("secrets", ("secrets",), {SECRETS_AGGREGATE: SecretTable()})
