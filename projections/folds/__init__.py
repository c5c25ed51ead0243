"""The read model's projections, by name: what ``controlplane projector`` keeps up to date and
``controlplane projections rebuild [NAME…]`` refolds. Each module of this package is one projection
(its tables and how events fold into them) on the machinery of ``tables``, ``rows`` and ``projection``."""

from __future__ import annotations

from collections.abc import Sequence

from projections.folds import (
    access,
    environments,
    queues,
    schedules,
    secrets,
    tasks,
    usage,
    worker_config,
    workers,
)
from projections.folds.projection import Projection

PROJECTIONS: dict[str, Projection] = {
    module.PROJECTION.name: module.PROJECTION
    for module in (tasks, workers, access, usage, environments, schedules, queues, worker_config, secrets)
}


def select(names: Sequence[str] | None) -> list[Projection]:
    """The projections called ``names`` (all when None), in a stable order."""
    if names is None:
        return list(PROJECTIONS.values())
    unknown = sorted(set(names) - PROJECTIONS.keys())
    if unknown:
        raise ValueError(f"unknown projection(s) {', '.join(unknown)}; known: {', '.join(PROJECTIONS)}")
    return [projection for name, projection in PROJECTIONS.items() if name in names]
