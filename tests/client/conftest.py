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
import uvicorn

from controlplane.client import AsyncClient, Client, Event
from controlplane.embedded import free_port
from gateway.app import build_app
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
    """``connect(role="admin", org="acme", key=None, transport=None, url=None, **options)``: a client
    of this test's flavour (of the stack's gateway, or the one at ``url``), closed at the end."""
    flavor: Flavor = request.param
    opened: list[Client | AsyncClient] = []

    def connect(
        role: str = "admin",
        *,
        org: str = "acme",
        key: str | None = None,
        transport: Faults | None = None,
        url: str | None = None,
        **options: Any,
    ) -> Either:
        api_key = key or stack.keys[org][role]
        client = (Client if flavor == "sync" else AsyncClient)(
            url or stack.url, api_key, transport=transport, **options
        )
        opened.append(client)
        return Either(client, flavor)

    yield connect
    for client in opened:
        if isinstance(client, AsyncClient):
            await client.close()
        else:
            client.close()


ProxyFault = Literal["refuse", "lose"]
"""What :class:`Proxy` does to one request: answer 503 itself, or forward it and then close the
connection instead of answering (the server acted; its answer is lost)."""


class Proxy:
    """A small HTTP/1.1 proxy on a free 127.0.0.1 port in front of the gateway, for requests with short
    answers (no streams). Each request it receives takes the next fault of ``plan`` (then none) and is
    recorded in ``received``; a request that is forwarded goes to the gateway as it came."""

    def __init__(self, upstream: str) -> None:
        self.plan: list[ProxyFault] = []
        self.received: list[httpx.Request] = []
        self._upstream_url = httpx.URL(upstream)
        self._upstream = httpx.AsyncClient(timeout=30)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.url = ""

    def sent(self, method: str, path_end: str) -> list[httpx.Request]:
        return [r for r in self.received if r.method == method and r.url.path.endswith(path_end)]

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self._connections:
            connection.close()
        await self._server.wait_closed()
        await self._upstream.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while (request := await _read_request(reader, self._upstream_url)) is not None:
                self.received.append(request)
                fault = self.plan.pop(0) if self.plan else None
                if fault == "refuse":
                    writer.write(_response_bytes(httpx.Response(503, json={"title": "Service unavailable"})))
                    await writer.drain()
                    continue
                answer = await self._upstream.send(request)
                if fault == "lose":
                    return
                writer.write(_response_bytes(answer))
                await writer.drain()
        finally:
            self._connections.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader, upstream: httpx.URL) -> httpx.Request | None:
    """The next request on the connection, addressed to ``upstream``; None once the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
    method, target, _ = request_line.split(" ", 2)
    headers = [tuple(line.split(": ", 1)) for line in header_lines]
    length = int(next((value for name, value in headers if name.lower() == "content-length"), "0"))
    content = await reader.readexactly(length)
    hop_by_hop = {"host", "connection", "content-length"}
    kept = [(name, value) for name, value in headers if name.lower() not in hop_by_hop]
    return httpx.Request(method, upstream.join(target), headers=kept, content=content)


def _response_bytes(response: httpx.Response) -> bytes:
    body = response.content
    dropped = {"content-length", "transfer-encoding", "connection", "content-encoding"}
    headers = [(name, value) for name, value in response.headers.items() if name.lower() not in dropped]
    lines = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}", *(f"{n}: {v}" for n, v in headers)]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RestartableGateway:
    """A gateway HTTP server of its own over the stack's services, on a port it keeps: :meth:`stop`
    takes it down (open streams are cut) while NATS, PostgreSQL and the projector stay up, and
    :meth:`start` brings it back on the same port."""

    def __init__(self, stack: Stack) -> None:
        self._services = stack.services
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = uvicorn.Config(
            build_app(self._services),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=0,  # cancel the open streams at once
        )
        self._server = uvicorn.Server(config)
        self._serving = asyncio.get_running_loop().create_task(self._server.serve())
        while not self._server.started:
            assert not self._serving.done(), "the gateway did not start"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stops the server, if it runs, and waits until it has."""
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        await asyncio.wait_for(self._serving, 10)
        self._server = self._serving = None


@pytest.fixture
async def restartable_gateway(stack: Stack) -> AsyncIterator[RestartableGateway]:
    gateway = RestartableGateway(stack)
    await gateway.start()
    yield gateway
    await gateway.stop()
