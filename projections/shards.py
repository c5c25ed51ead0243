"""Shards of a projection and the checkpoint rows that record how far each got: which orgs a shard
owns, how a checkpoint row is named for a projection run unsharded or by one shard of a set, and what
readers take as a projection's checkpoint (the minimum over its shards)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (numbered from 1: ``1/2`` is the first of two) owns the orgs
    whose stable hash falls on it, and keeps its own checkpoint row ``<projection>@<index>/<count>``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"invalid shard {self}: the shard count must be at least 1")
        if not 1 <= self.index <= self.count:
            raise ValueError(f"invalid shard {self}: the shards of {self.count} are numbered 1 to {self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, org: str) -> bool:
        # sha256, not hash(): Python randomizes str hashes per process, and every shard process and
        # every restart must agree on which shard an org belongs to.
        return int.from_bytes(hashlib.sha256(org.encode()).digest()[:8], "big") % self.count == self.index - 1

    def siblings(self) -> list[Shard]:
        """Every shard of this one's set, itself included."""
        return [Shard(index, self.count) for index in range(1, self.count + 1)]


def parse_shard(text: str) -> Shard:
    """``"1/2"`` → ``Shard(1, 2)``; a ValueError that says what is expected otherwise."""
    index, slash, count = text.strip().partition("/")
    if not (slash and index.isdigit() and count.isdigit()):
        raise ValueError(f"invalid shard {text!r}: expected INDEX/COUNT, e.g. 1/2 for the first of two shards")
    return Shard(int(index), int(count))


_SHARD_MARK = "@"


def checkpoint_key(projection: str, shard: Shard | None) -> str:
    """The checkpoints row (and writer lock) of ``projection`` as run by ``shard``, or unsharded."""
    return projection if shard is None else f"{projection}{_SHARD_MARK}{shard}"


def parse_checkpoint_key(key: str) -> tuple[str, Shard | None]:
    projection, mark, shard = key.partition(_SHARD_MARK)
    return projection, parse_shard(shard) if mark else None


def layout_keys(projection: str, shard: Shard | None) -> list[str]:
    """The rows a projection run unsharded (``shard`` None) or by ``shard``'s set keeps."""
    if shard is None:
        return [projection]
    return [checkpoint_key(projection, sibling) for sibling in shard.siblings()]


def layout_of(rows: Mapping[str, int], projection: str) -> dict[str, int]:
    """The rows of ``rows`` that make up ``projection``'s checkpoint: its shards' rows if it has
    any, else its own row (absent when it never ran)."""
    own = {key: seq for key, seq in rows.items() if parse_checkpoint_key(key)[0] == projection}
    shards = {key: seq for key, seq in own.items() if key != projection}
    return shards or own


def effective_checkpoints(rows: Mapping[str, int]) -> dict[str, int]:
    """Each projection's checkpoint as readers see it, from raw checkpoint rows: what every one of
    its shards has reached (their minimum), or its own row when it runs unsharded."""
    projections = {parse_checkpoint_key(key)[0] for key in rows}
    return {projection: min(layout_of(rows, projection).values()) for projection in projections}


async def fetch_checkpoints(target: asyncpg.Pool | asyncpg.Connection) -> dict[str, int]:
    """Every checkpoint row, keyed as :func:`checkpoint_key` names them: the stream sequence of the
    last event the projection (or one shard of it) folded. Readers want :func:`effective_checkpoints`."""
    return {row["projection"]: row["seq"] for row in await target.fetch("SELECT projection, seq FROM checkpoints")}
