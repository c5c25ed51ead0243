"""A policy worker process: evaluates Rego for its parent, one request at a time, over a socket.

rego-cpp cannot be interrupted (its C API has no cancel, step limit or deadline), so a Rego
evaluation that blows its time budget is stopped the only honest way: the parent kills this
process by its PID and starts another (`policies_wasm.processes`). Everything here is what must
survive that — nothing: the worker keeps only compiled bundles, which the parent can send again.

    python -m policies_wasm.worker FD PARENT_PID

Requests and replies are msgpack frames (multiprocessing's length-prefixed framing) on the inherited
socket FD. The worker exits when the socket closes, and on Linux also when its parent dies (a
runaway evaluation never reads the socket, so it would not notice an EOF).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from policies_wasm.engine import Bundle, Decision, PolicyEngine, PolicyError
from policies_wasm.engines import open_engine

MAX_ENGINES = 64


class Load(msgspec.Struct, tag=True, frozen=True):
    modules: dict[str, str]
    data: dict[str, Any]
    wasm: bytes | None
    revision: str
    origin: str


class Evaluate(msgspec.Struct, tag=True, frozen=True):
    digest: str
    entrypoint: str
    input: bytes  # the canonical JSON of the input


class Answer(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    cpu_seconds: float = 0.0
    """The worker's CPU time when it answered: an idle worker uses none, so the parent can tell, from
    /proc, how much CPU the next request has used so far."""


class Ready(Answer, frozen=True):
    """Sent once, when the worker has imported its engines and waits for requests."""


class Loaded(Answer, frozen=True):
    engine: str


class Decided(Answer, frozen=True):
    decision: Decision


class Missing(Answer, frozen=True):
    """The bundle is not loaded here (never sent, or evicted): send Load, then ask again."""


class Failed(Answer, frozen=True):
    error: str  # the PolicyError subclass's name
    message: str


Request = Load | Evaluate
Reply = Ready | Loaded | Decided | Missing | Failed


def load_request(bundle: Bundle) -> Load:
    return Load(
        modules=dict(bundle.modules), data=bundle.data, wasm=bundle.wasm, revision=bundle.revision, origin=bundle.origin
    )


def serve(connection: Connection) -> None:
    engines: OrderedDict[str, PolicyEngine] = OrderedDict()
    decode = msgspec.msgpack.Decoder(Request).decode
    encode = msgspec.msgpack.Encoder().encode
    import policies_wasm.rego  # noqa: F401 - before Ready, so the first request's budget is not spent importing

    connection.send_bytes(encode(Ready(cpu_seconds=time.process_time())))
    while True:
        try:
            request = decode(connection.recv_bytes())
        except (EOFError, OSError):
            return
        answer = _answer(request, engines)
        connection.send_bytes(encode(msgspec.structs.replace(answer, cpu_seconds=time.process_time())))


def _answer(request: Request, engines: OrderedDict[str, PolicyEngine]) -> Reply:
    try:
        if isinstance(request, Load):
            bundle = Bundle(request.modules, request.data, request.wasm, request.revision, request.origin)
            engine = engines.get(bundle.digest) or open_engine(bundle)
            engines[bundle.digest] = engine
            engines.move_to_end(bundle.digest)
            while len(engines) > MAX_ENGINES:
                engines.popitem(last=False)
            return Loaded(engine.name)
        engine = engines.get(request.digest)
        if engine is None:
            return Missing()
        engines.move_to_end(request.digest)
        return Decided(engine.evaluate(request.entrypoint, msgspec.json.decode(request.input)))
    except PolicyError as exc:
        return Failed(type(exc).__name__, str(exc))
    except Exception as exc:  # a bug here must not take the worker (and the request after) down with it
        return Failed("PolicyEvaluationError", f"the policy worker failed: {exc!r}")


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)


def main(argv: list[str]) -> None:
    fd, parent_pid = int(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the parent; it stops us itself
    serve(Connection(fd))


if __name__ == "__main__":
    main(sys.argv[1:])
