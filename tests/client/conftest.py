"""The client tests' own stack (gateway and projector on a private nats-server and a fresh database),
each test's clients in both flavours, and a transport that injects faults between client and gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from controlplane.client import AsyncClient, Client, Event
from tests.gateway.conftest import Stack, own_stack

Flavor = Literal["sync", "async"]


@pytest.fixture(scope="package")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    directory: Path = tmp_path_factory.mktemp("client-stack")
    async with own_stack(directory, database_url) as served:
        yield served


class Either:
    """A :class:`Client` or :class:`AsyncClient` (or one of their namespaces) used the same way from a
    test's event loop: every method is awaited. A Client's blocking calls run in a worker thread, since
    the gateway serves on this very loop; what a method iterates is collected into a list."""

    def __init__(self, target: Any, flavor: Flavor) -> None:
        self._target, self.flavor = target, flavor

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name in ("approvals", "signals", "workers"):
            return Either(attribute, self.flavor)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.flavor == "async":
                result = attribute(*args, **kwargs)
                return [item async for item in result] if isinstance(result, AsyncIterator) else await result

            def blocking() -> Any:
                result = attribute(*args, **kwargs)
                return list(result) if isinstance(result, Iterator) else result

            return await asyncio.to_thread(blocking)

        return call

    async def take(self, count: int, **stream: Any) -> list[Event]:
        """The first ``count`` events of ``stream(**stream)``, then the stream is closed."""
        if self.flavor == "async":
            taken: list[Event] = []
            async with contextlib.aclosing(self._target.stream(**stream)) as events:
                async for event in events:
                    taken.append(event)
                    if len(taken) == count:
                        break
            return taken

        def blocking() -> list[Event]:
            events = self._target.stream(**stream)
            try:
                return [next(events) for _ in range(count)]
            finally:
                events.close()

        return await asyncio.to_thread(blocking)


@dataclass(frozen=True)
class Drop:
    """Forward the request, then lose its answer (the connection breaks before it arrives)."""


@dataclass(frozen=True)
class Cut:
    """Forward the request and stream the answer, but break the connection after ``events`` events."""

    events: int


Fault = Drop | Cut | httpx.Response
"""What :class:`Faults` does to one request; a response is answered instead of the gateway's."""


class Faults(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """An httpx transport (for Client and AsyncClient alike) in front of the real one: records every
    request, and applies ``fault(request)`` when it gives one."""

    def __init__(self, fault: Callable[[httpx.Request], Fault | None] = lambda request: None) -> None:
        self.fault = fault
        self.requests: list[httpx.Request] = []
        self._sync, self._async = httpx.HTTPTransport(), httpx.AsyncHTTPTransport()

    def sent(self, method: str, path_end: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.endswith(path_end)]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.fault(request)
        if isinstance(fault, httpx.Response):
            return fault
        response = self._sync.handle_request(request)
        if isinstance(fault, Drop):
            response.read()
            response.close()
            raise httpx.ReadError("the answer was lost", request=request)
        if isinstance(fault, Cut):
            return _with_stream(response, _CutStream(response.stream, fault.events))
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.fault(request)
        if isinstance(fault, httpx.Response):
            return fault
        response = await self._async.handle_async_request(request)
        if isinstance(fault, Drop):
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("the answer was lost", request=request)
        if isinstance(fault, Cut):
            return _with_stream(response, _CutStream(response.stream, fault.events))
        return response

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        await self._async.aclose()


def _with_stream(response: httpx.Response, stream: _CutStream) -> httpx.Response:
    return httpx.Response(response.status_code, headers=response.headers, stream=stream, extensions=response.extensions)


class _CutStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """An SSE body passed on message by message until ``events`` events went through, then a broken
    connection (``httpx.ReadError``)."""

    def __init__(self, inner: Any, events: int) -> None:
        self._inner, self._left = inner, events
        self._pending = b""

    def _messages(self, chunk: bytes) -> list[bytes]:
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n\n")
        return [message + b"\n\n" for message in complete]

    def _sent(self, message: bytes) -> None:
        if message.startswith(b"id:"):
            self._left -= 1
        if self._left == 0:
            raise httpx.ReadError("the connection broke")

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            for message in self._messages(chunk):
                yield message
                self._sent(message)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            for message in self._messages(chunk):
                yield message
                self._sent(message)

    def close(self) -> None:
        self._inner.close()

    async def aclose(self) -> None:
        await self._inner.aclose()


Connect = Callable[..., Either]


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest, stack: Stack) -> AsyncIterator[Connect]:
    """``connect(role="admin", org="acme", key=None, transport=None, **options)``: a client of this
    test's flavour, closed at the end."""
    flavor: Flavor = request.param
    opened: list[Client | AsyncClient] = []

    def connect(
        role: str = "admin",
        *,
        org: str = "acme",
        key: str | None = None,
        transport: Faults | None = None,
        **options: Any,
    ) -> Either:
        api_key = key or stack.keys[org][role]
        client = (Client if flavor == "sync" else AsyncClient)(stack.url, api_key, transport=transport, **options)
        opened.append(client)
        return Either(client, flavor)

    yield connect
    for client in opened:
        if isinstance(client, AsyncClient):
            await client.close()
        else:
            client.close()
