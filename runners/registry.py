"""Workflows by name and version. A runner advertises ``workflow:<name>@v<version>`` capabilities, so
the claim rule (required ⊆ offered) sends a task only to runners that host its workflow."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from eventsourcing.utils import TopicError, resolve_topic

from core.domain.task import workflow_capability as capability

WorkflowFn = Callable[[Any, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Workflow:
    name: str
    version: int
    fn: WorkflowFn

    @property
    def capability(self) -> str:
        return capability(self.name, self.version)


def workflow(name: str, *, version: int = 1) -> Callable[[WorkflowFn], Workflow]:
    """``@workflow("deploy", version=2)`` on an ``async def fn(ctx, payload)``."""

    def register(fn: WorkflowFn) -> Workflow:
        return Workflow(name, version, fn)

    return register


class Registry:
    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._by_key: dict[tuple[str, int], Workflow] = {}
        for item in workflows:
            self.add(item)

    def add(self, item: Workflow) -> None:
        key = (item.name, item.version)
        if key in self._by_key:
            raise ValueError(f"workflow {item.name} v{item.version} is registered twice")
        self._by_key[key] = item

    def find(self, name: str, version: int | None) -> Workflow | None:
        if version is not None:
            return self._by_key.get((name, version))
        versions = [v for (n, v) in self._by_key if n == name]
        return self._by_key[(name, max(versions))] if versions else None

    def capabilities(self) -> list[str]:
        names = {name for name, _ in self._by_key}
        return sorted({w.capability for w in self._by_key.values()} | {capability(n, None) for n in names})

    @classmethod
    def load(cls, topics: Iterable[str]) -> Registry:
        """``module:attr`` references, each a Workflow or an iterable of them (``--workflows``)."""
        registry = cls()
        for topic in topics:
            try:
                found = resolve_topic(topic)
            except TopicError as exc:
                raise ValueError(f"cannot load workflows from {topic!r}: {exc}") from exc
            for item in [found] if isinstance(found, Workflow) else list(found):
                if not isinstance(item, Workflow):
                    raise ValueError(f"{topic!r} holds {item!r}, not a @workflow")
                registry.add(item)
        return registry
