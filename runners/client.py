"""The runner's side of the public HTTP API: a runner is a worker like any other."""

from __future__ import annotations

from typing import Any

import httpx


class LeaseLost(Exception):
    """The gateway answered 409 for a lease-bound call: another runner may own the task now."""


class TaskApi:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 40.0) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def register(self, worker_id: str, queue: str, capabilities: list[str]) -> None:
        await self._call("POST", "/v1/workers", {"worker_id": worker_id, "queue": queue, "capabilities": capabilities})

    async def worker_heartbeat(self, worker_id: str, status: str) -> None:
        await self._call("POST", f"/v1/workers/{worker_id}/heartbeat", {"status": status})

    async def claim(
        self, worker_id: str, queue: str, capabilities: list[str], block_ms: int, lease_seconds: float, max_tasks: int
    ) -> list[dict[str, Any]]:
        """Up to ``max_tasks`` claims, each ``{task, lease}``; none if nothing came free within ``block_ms``."""
        response = await self._http.post(
            "/v1/tasks/claim-batch",
            json={
                "worker_id": worker_id,
                "queue": queue,
                "capabilities": capabilities,
                "block_ms": block_ms,
                "lease_seconds": lease_seconds,
                "max_tasks": max_tasks,
                "workflows_only": True,
            },
        )
        if response.status_code == 204:
            return []
        _raise_for(response)
        return response.json()["items"]  # type: ignore[no-any-return]

    async def policy_bundle(self, version: int) -> dict[str, Any]:
        """Version ``version`` of the org's policy bundle, in full (``wasm`` base64 or null)."""
        response = await self._http.get(f"/v1/policy-bundles/{version}")
        _raise_for(response)
        return response.json()  # type: ignore[no-any-return]

    async def lease_call(self, task_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """heartbeat, operations, sleep, approval-requests, complete, fail, non-determinism."""
        return await self._call("POST", f"/v1/tasks/{task_id}/{action}", body)

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._http.request(method, path, json=body)
        _raise_for(response)
        return response.json() if response.content else {}  # type: ignore[no-any-return]


def _raise_for(response: httpx.Response) -> None:
    if response.status_code == 409:
        raise LeaseLost(response.json().get("detail", response.text))
    if response.is_error:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:500]}"
        )
