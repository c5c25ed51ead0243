"""A runner's policy engines: which bundle decides a task's policy questions, and evaluating it within
the policy budget. Workflows ask through ``ctx.policy`` (``runners.context``), which records each
decision."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from core.domain.events import PolicyDecision
from policies_wasm import Bundle, PolicyLoadError, default_bundle
from policies_wasm.budget import PolicyEvaluator
from runners.client import TaskApi

log = logging.getLogger(__name__)


class Policies:
    """A runner's policy engines. A task is decided by the bundle it was submitted under: its org's
    pushed version, fetched from the gateway once and kept, or the shipped policies (``shipped``
    overrides them). A fetched bundle whose content does not match the digest the task recorded is
    refused: the policy then cannot decide, which denies. Evaluations run off the event loop on the
    policy budget (``policies_wasm.budget``), as in the gateway: an overrun is a ``PolicyTimeout``."""

    def __init__(self, shipped: Bundle | None = None, *, evaluator: PolicyEvaluator | None = None) -> None:
        self._shipped = shipped
        self._evaluator = evaluator or PolicyEvaluator()
        self._pushed: dict[tuple[str, int], Bundle] = {}
        self._warned: set[str] = set()

    async def evaluate(
        self, entrypoint: str, input: Any, *, org: str, pinned: dict[str, Any] | None, api: TaskApi
    ) -> PolicyDecision:
        version = None if pinned is None else pinned.get("version")
        if version is None:
            bundle = await self._shipped_bundle()
            if pinned is not None and pinned["digest"] != bundle.digest and pinned["digest"] not in self._warned:
                self._warned.add(pinned["digest"])
                log.warning(
                    "tasks submitted under the gateway's shipped policies %s are decided here by this runner's "
                    "own, %s: ship the same policy files to gateways and runners, or push a bundle",
                    pinned["digest"],
                    bundle.digest,
                )
        else:
            bundle = await self._pushed_bundle(org, version, pinned["digest"], api)  # type: ignore[index]
        decided = await self._evaluator.evaluate(bundle, entrypoint, input, owner=org)
        return PolicyDecision.from_engine(decided)

    def close(self) -> None:
        """Stops the evaluator's worker processes (also done when this object is collected)."""
        self._evaluator.close()

    async def _shipped_bundle(self) -> Bundle:
        if self._shipped is None:
            self._shipped = await asyncio.to_thread(default_bundle)  # reads the policy files
        return self._shipped

    async def _pushed_bundle(self, org: str, version: int, digest: str, api: TaskApi) -> Bundle:
        bundle = self._pushed.get((org, version))
        if bundle is None:
            document = await api.policy_bundle(version)
            bundle = Bundle(
                modules=document["modules"],
                data=document["data"],
                wasm=None if document["wasm"] is None else base64.b64decode(document["wasm"]),
                revision=document["revision"],
                origin=f"policy bundle version {version} of org {org}",
            )
            if bundle.digest != digest:
                raise PolicyLoadError(
                    f"policy bundle version {version} of org {org} has digest {bundle.digest}, "
                    f"but the task was submitted under {digest}"
                )
            self._pushed[(org, version)] = bundle
        return bundle
