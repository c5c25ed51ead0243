"""Bad input to every route of /v1/ never gets a 5xx, every refusal is problem+json, and a refused
request appends nothing to the log.

Hypothesis sends, one request at a time, to every POST and DELETE route of the gateway (with the ids of
real tasks, an approval, a worker and an API key in the path, and random or malformed ids): random
bytes, random JSON of the wrong shape, valid bodies with fields made oversize, beyond 64 bits, holding
NUL or lone surrogates, nested too deep or of the wrong type, corrupted JSON, wrong content types, and
bodies just under and over the 1 MiB limit (also sent chunked, without a Content-Length). A second
campaign sends every GET route of /v1/ (event streams included) hostile query strings: numbers beyond
64 bits or 4,300 digits, other scripts' digits, signs and exponents, NUL, newlines, empty values,
repeated keys, undecodable percent escapes and forged cursors. Both send hostile headers too:
Authorization without a credential, with unknown, malformed or oversize ones, other schemes, non-ASCII;
Last-Event-ID and Idempotency-Key the same way.

"Nothing appended" is checked on the log itself: before each request the campaign notes the stream's
last sequence, and after a refusal it reads every message stored since on its org's subjects
(``cp.<org>.>`` events and ``cpsched.<org>.>`` timer definitions). Requests go one at a time and the org
is the campaign's own, so any such message was caused by this request, except a timer armed by an earlier
accepted request firing meanwhile: fired timers carry no command id and the timer actor, and are told
apart by that. (The campaign also has a nats-server of its own, since two projectors on one stream would
share its durable consumers; the org filter would keep the check right on a shared stream too.) The one
refusal that appends by design is a submit the policy denies: 403 and a recorded TaskSubmissionDenied.

``make test`` sends ``CP_BAD_INPUT_EXAMPLES`` (default 150) requests per campaign; ``make test-chaos``
2,000."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import string
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from controlplane.seed import seed_org
from core.domain.events import TaskSubmissionDenied
from core.domain.ids import new_id
from core.domain.records import RecordedEvent
from core.log.event_store import TIMER_ACTOR
from gateway.app import build_app
from gateway.services import RateLimiter
from tests.gateway.conftest import ROLES, Stack, own_stack

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

EXAMPLES = int(os.environ.get("CP_BAD_INPUT_EXAMPLES", "150"))
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
READING = {"GET"}
QUEUE = "bad-input"
WORKER_ID = "bad-input-worker"
REQUEST_TIMEOUT_SECONDS = 30.0
CHUNK_BYTES = 64 * 1024


# --- the stack and the real objects the campaign aims at ------------------------------------------------


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> AsyncIterator[Stack]:
    """This module's own stack, gone with the module: its log, request metrics and claim long-poll limit
    are the campaign's alone. The campaigns send a refused credential every few requests, far faster than
    the per-address throttle allows (it would answer most of what follows with 429 and the input would not
    be looked at): it is loosened here, and tested in tests/security/test_edge_auth.py."""
    async with own_stack(tmp_path_factory.mktemp("bad-input-nats"), database_url) as served:
        served.services.limits.max_block_ms = 100  # a generated long-poll would only wait
        served.services.failed_auth = RateLimiter(rate=1000.0, burst=1000.0)
        yield served


@dataclass
class Target:
    """An org of the campaign's own, its admin key, and the real objects its requests name."""

    org: str
    admin_key: str
    ids: dict[str, list[str]]  # path parameter -> ids of real objects
    lease: dict[str, str]  # worker_id and lease_id of the running task


@pytest.fixture(scope="module")
async def target(stack: Stack) -> Target:
    org = f"bad{new_id()[-12:]}"
    keys = await seed_org(stack.services.handler, org, ROLES)
    await stack.projector.run_until_caught_up()

    def client(role: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {keys[role]}"}, timeout=20)

    async def ok(response: httpx.Response) -> dict[str, Any]:
        assert response.status_code in (200, 201), response.text
        return response.json()  # type: ignore[no-any-return]

    async with client("admin") as admin, client("worker") as worker:
        # No timer of these objects falls due during the campaign: fired timers would be told apart
        # anyway, but the objects stay in the states that reach deep into each command.
        worker_body = {
            "worker_id": WORKER_ID,
            "queue": QUEUE,
            "capabilities": ["gpu"],
            "heartbeat_timeout_seconds": 3600,
        }
        await ok(await worker.post("/v1/workers", json=worker_body))
        claim = {"worker_id": WORKER_ID, "queue": QUEUE, "capabilities": ["gpu"], "lease_seconds": 24 * 3600}
        task = {"type": "bad-input", "queue": QUEUE, "required_capabilities": ["gpu"]}
        running = await ok(await admin.post("/v1/tasks", json=task))
        lease = (await ok(await worker.post("/v1/tasks/claim", json=claim)))["lease"]["id"]
        waiting = await ok(await admin.post("/v1/tasks", json=task))
        waiting_lease = (await ok(await worker.post("/v1/tasks/claim", json=claim)))["lease"]["id"]
        approval = await ok(
            await worker.post(
                f"/v1/tasks/{waiting['id']}/approval-requests",
                json={"worker_id": WORKER_ID, "lease_id": waiting_lease, "reason": "may the campaign go on?"},
            )
        )
        pending = await ok(await admin.post("/v1/tasks", json=task))
        key = await ok(await admin.post("/v1/api-keys", json={"name": "bad-input victim", "roles": ["viewer"]}))
    return Target(
        org=org,
        admin_key=keys["admin"],
        ids={
            "task_id": [running["id"], waiting["id"], pending["id"]],
            "approval_id": [approval["id"]],
            "worker_id": [WORKER_ID],
            "key_id": [key["id"]],
            "version": ["current", "1"],
        },
        lease={"worker_id": WORKER_ID, "lease_id": lease},
    )


def state_changing_routes(stack: Stack, methods: set[str] = STATE_CHANGING) -> list[tuple[str, str]]:
    """(method, path template) of every API route that may change state (or, with ``methods``, of those
    routes), read from the app itself so a route added later is fuzzed too. The console's forms answer
    pages, not problem+json, and need a session: tests/console/test_console_bad_input.py sends them theirs."""
    app = build_app(stack.services)
    return sorted(
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route) and route.path.startswith("/v1/")
        for method in (route.methods or ()) & methods
    )


def valid_bodies(target: Target) -> dict[str, dict[str, Any]]:
    """A well-formed body per route, for the mutations to start from; ``{}`` for a route not named."""
    lease = target.lease
    claim = {"worker_id": WORKER_ID, "queue": QUEUE, "capabilities": ["gpu"], "block_ms": 0, "lease_seconds": 30}
    return {
        "/v1/tasks": {
            "type": "deploy",
            "payload": {"env": "staging", "steps": [1, 2]},
            "queue": QUEUE,
            "required_capabilities": ["gpu"],
            "priority": "low",
            "max_retries": 3,
            "timeout_seconds": 600,
            "retry_backoff_seconds": 1.0,
            "metadata": {"environment": "staging", "tools": ["shell"], "estimated_cost_usd": 1},
            "workflow": {"name": "deploy", "version": 1},
        },
        "/v1/tasks/claim": claim,
        "/v1/tasks/claim-batch": {**claim, "max_tasks": 2},
        "/v1/tasks/{task_id}/heartbeat": {**lease, "lease_seconds": 24 * 3600, "progress": {"done": 1}},
        "/v1/tasks/{task_id}/approval-requests": {
            **lease,
            "reason": "ship it?",
            "approvers": ["role:approver"],
            "quorum": 1,
            "timeout_seconds": 3600,
            "journal_index": 0,
        },
        "/v1/tasks/{task_id}/complete": {**lease, "result": {"ok": True}},
        "/v1/tasks/{task_id}/fail": {**lease, "error": {"message": "boom"}, "retryable": True},
        "/v1/tasks/{task_id}/cancel": {"reason": "no longer needed"},
        "/v1/tasks/{task_id}/operations": {**lease, "index": 0, "kind": "step", "name": "plan", "result": [1]},
        "/v1/tasks/{task_id}/sleep": {**lease, "index": 0, "seconds": 3600},
        "/v1/tasks/{task_id}/non-determinism": {**lease, "index": 0, "expected": "a", "actual": "b"},
        "/v1/tasks/{task_id}/signals": {"name": "go", "payload": {"answer": "staging", "n": [1, 2]}},
        "/v1/tasks/{task_id}/signal-waits": {**lease, "index": 0, "name": "go", "timeout_seconds": 3600},
        "/v1/approvals/{approval_id}/approve": {"comment": "fine"},
        "/v1/approvals/{approval_id}/reject": {"reason": "not today"},
        "/v1/workers": {
            "worker_id": "bad-input-other",
            "queue": QUEUE,
            "capabilities": ["gpu"],
            "labels": {"zone": "a"},
            "model": "m",
            "provider": "p",
            "heartbeat_timeout_seconds": 3600,
        },
        "/v1/workers/{worker_id}/heartbeat": {"status": "ready"},
        "/v1/api-keys": {"name": "k", "roles": ["viewer"]},
        "/v1/environments": {"name": "fuzzed", "queues": [f"{QUEUE}-env"], "labels": {"tier": "a"}},
        "/v1/environments/{name}": {"queues": [f"{QUEUE}-env"], "labels": {"tier": "a"}},
    }


# --- what is sent ----------------------------------------------------------------------------------------


class BadRequest:
    """One request of the campaign. Not a dataclass: hypothesis prints a failing example with this short
    repr instead of field by field, which would show a 1 MiB body."""

    def __init__(
        self,
        method: str,
        route: str,
        path: str,
        shape: str,
        content: bytes,
        headers: dict[str, str | bytes],
        chunked: bool,
    ) -> None:
        self.method, self.route, self.path = method, route, path  # route: the path template
        self.shape = shape  # which kind of bad input, for the tally
        self.content, self.headers = content, headers
        self.chunked = chunked  # streamed without a Content-Length

    def __repr__(self) -> str:
        shown = self.content if len(self.content) <= 300 else self.content[:300] + b"..."
        return (
            f"BadRequest({self.method} {self.path} [{self.shape}] headers={self.headers} chunked={self.chunked} "
            f"{len(self.content)} bytes: {shown!r})"
        )


SHAPES = [
    *("mutated",) * 3,
    "random bytes",
    "random json",
    "corrupted json",
    "oversize",
    "at limit",
    "empty",
]
IDEMPOTENCY_KEY_CHARACTERS = string.ascii_letters + string.digits + "-"
# Printable ASCII without leading or trailing blanks: what an HTTP client can send (httpx refuses the rest).
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


# Raw JSON text, so values json.dumps cannot make (deep nesting, bad escapes, raw bytes) can be sent too.
nasty_fragments: st.SearchStrategy[bytes] = st.one_of(
    # oversize strings: past every field's limit (tokens 63, names 256, texts 4096), some past 1 MiB
    st.builds(
        lambda char, length: json.dumps(char * length).encode(),
        st.sampled_from(["x", "é", "😀"]),
        st.one_of(st.integers(64, 300), st.integers(4000, 5000), st.integers(5000, 300_000)),
    ),
    # NUL in a value or a key, lone surrogates, invalid UTF-8 inside a string
    st.builds(lambda a, b: json.dumps(f"{a}\x00{b}").encode(), st.text(max_size=8), st.text(max_size=8)),
    st.builds(lambda a: b"{" + json.dumps(f"{a}\x00").encode() + b": 1}", st.text(max_size=8)),
    st.sampled_from([b'"\\ud800"', b'"\\udfff"', b'"a\\ud83dz"', b'"\\u0000"']),
    st.binary(min_size=1, max_size=16).map(lambda raw: b'"' + raw.replace(b'"', b"") + b'"'),
    # numbers beyond 64 bits, beyond any float, not numbers at all
    st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)).map(lambda n: str(n).encode()),
    st.sampled_from([b"18446744073709551616", b"9" * 5000, b"1e400", b"-1e400", b"NaN", b"Infinity", b"-0.0"]),
    st.floats().map(lambda x: json.dumps(x).encode()),
    # arrays and objects past every length limit, values nested deeper than anything should accept
    st.integers(65, 20_000).map(lambda n: b"[" + b",".join([b"1"] * n) + b"]"),
    st.integers(65, 5_000).map(lambda n: b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(n)) + b"}"),
    st.builds(_nested, st.integers(30, 5_000), st.sampled_from(["list", "dict"])),
    # the wrong type, or nothing
    json_values.map(lambda value: json.dumps(value).encode()),
    st.sampled_from([b"null", b'""', b"[]", b"{}", b"true"]),
)


def _encode_with(body: dict[str, Any], fragments: dict[str, bytes]) -> bytes:
    """``body`` as JSON with each fragment as the raw value of its key."""
    placeholders = {key: f"\x01placeholder-{i}\x01" for i, key in enumerate(fragments)}
    text = json.dumps({**body, **placeholders}).encode()
    for key, placeholder in placeholders.items():
        text = text.replace(json.dumps(placeholder).encode(), fragments[key], 1)
    return text


@st.composite
def mutated_body(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """A valid body with one to three fields replaced by nasty values (bare, or inside a list or an
    object), perhaps a required field removed, perhaps an unknown field added."""
    body = dict(valid)
    if body and draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))))
    keys = st.sampled_from(sorted(valid)) | st.text(max_size=10) if valid else st.text(max_size=10)
    fragments = {}
    for key in draw(st.lists(keys, min_size=1, max_size=3, unique=True)):
        fragment = draw(nasty_fragments)
        fragments[key] = draw(st.sampled_from([fragment, b"[" + fragment + b"]", b'{"k":' + fragment + b"}"]))
    return _encode_with({k: v for k, v in body.items() if k not in fragments}, fragments)


@st.composite
def bad_requests(draw: st.DrawFn, routes: list[tuple[str, str]], target: Target, limit: int) -> BadRequest:
    method, route = draw(st.sampled_from(routes))
    valid = valid_bodies(target).get(route, {})
    path = draw(filled_path(route, target))
    if draw(one_in(4)):  # a query string is no part of a command: it must not matter
        path += draw(hostile_query(QUERY_NAMES))

    shape = draw(st.sampled_from(SHAPES))
    content: bytes
    if shape == "mutated":
        content = draw(mutated_body(valid))
    elif shape == "random bytes":
        content = draw(st.binary(max_size=2048))
    elif shape == "random json":
        content = json.dumps(draw(json_values)).encode()
    elif shape == "corrupted json":
        text = json.dumps(valid).encode()
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, len(text)))
        content = text[:start] + draw(st.binary(max_size=32)) + text[end:]
    elif shape == "oversize":  # past the limit: a huge field, whitespace padding, or noise
        over = limit + draw(st.integers(1, 4096))
        padding = draw(st.sampled_from(["field", "whitespace", "noise"]))
        if padding == "field":
            field_name = draw(st.sampled_from(sorted(valid) or ["payload"]))
            content = _encode_with(valid, {field_name: b'"' + b"x" * over + b'"'})
        elif padding == "whitespace":
            content = json.dumps(valid).encode() + b" " * over
        else:
            noise = draw(st.binary(min_size=1, max_size=64))
            content = (noise * (over // len(noise) + 1))[:over]
    elif shape == "at limit":  # a valid body just within the limit: must fit into the log, or be refused
        field_name = draw(st.sampled_from(sorted(valid) or ["payload"]))
        size = limit - draw(st.integers(0, 4096))
        filler = size - len(_encode_with(valid, {field_name: b'""'}))
        content = _encode_with(valid, {field_name: b'"' + b"x" * filler + b'"'})
    else:
        content = b""

    headers: dict[str, str | bytes] = draw(hostile_headers(target, odd=6))
    content_type = draw(  # mostly JSON, or the body would mostly meet a 415 before anything else
        st.sampled_from(
            ["application/json"] * 12
            + [
                "application/json; charset=utf-8",
                "application/merge-patch+json",
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/octet-stream",
                "",
                "none",
                "random",
            ]
        )
    )
    if content_type == "random":
        headers["Content-Type"] = draw(HEADER_TEXT)
    elif content_type != "none":
        headers["Content-Type"] = content_type
    idempotency = draw(st.sampled_from(["none", "none", "valid", "empty", "too long"]))
    if idempotency == "valid":
        headers["Idempotency-Key"] = draw(st.text(alphabet=IDEMPOTENCY_KEY_CHARACTERS, min_size=1, max_size=40))
    elif idempotency == "empty":
        headers["Idempotency-Key"] = ""
    elif idempotency == "too long":
        headers["Idempotency-Key"] = "k" * draw(st.integers(256, 2000))
    return BadRequest(method, route, path, shape, content, headers, chunked=draw(st.booleans()))


@st.composite
def filled_path(draw: st.DrawFn, route: str, target: Target) -> str:
    """The route template with each path parameter a real object's id, another token, or junk."""

    def path_id(name: str) -> str:
        real = target.ids.get(name, [])
        token = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
        junk = st.text(min_size=1, max_size=80).map(lambda text: quote(text, safe="")) | st.sampled_from(
            [quote(value, safe="") for value in HOSTILE_NUMBERS]
        )
        return draw((st.sampled_from(real) | token | junk) if real else (token | junk))

    path = route
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + path_id(path[start + 1 : end]) + path[end + 1 :]
    return path


@st.composite
def bad_reads(draw: st.DrawFn, routes: list[tuple[str, str]], target: Target) -> BadRequest:
    """A GET of /v1/ with a hostile query string and hostile headers (or the admin's key)."""
    method, route = draw(st.sampled_from(routes))
    path = draw(filled_path(route, target)) + draw(hostile_query(QUERY_NAMES_OF.get(route, QUERY_NAMES)))
    headers = draw(hostile_headers(target, odd=4))
    return BadRequest(method, route, path, "hostile query", b"", headers, chunked=False)


# --- hostile query strings and headers ---------------------------------------------------------------------

QUERY_NAMES = [
    *("status", "queue", "priority", "workflow", "limit", "cursor", "min_seq", "task_id", "capability"),
    *("available", "types", "after", "from", "to", "group_by", "wait_seconds", "environment"),
]
HOSTILE_NUMBERS = [
    *("", " ", "0", "-0", "-1", "+1", "1e3", "5.0", "0x10", "1_000", " 7", "7 ", "05", "NaN", "inf"),
    "\u00b2",  # superscript two: str.isdigit() says True, int() says no
    "\u0663",  # Arabic-Indic three: int() takes it
    "\uff11\uff12",  # fullwidth digits
    "9" * 5_000,  # past int()'s 4,300 digits
    str(10**20),
    str(2**63 - 1),
    str(2**63),
    str(2**64),
    str(-(2**63) - 1),
]
QUERY_NAMES_OF = {
    "/v1/tasks": ["status", "queue", "priority", "workflow", "limit", "cursor", "min_seq"],
    "/v1/approvals": ["status", "task_id", "limit", "cursor", "min_seq"],
    "/v1/workers": ["queue", "capability", "available", "min_seq"],
    "/v1/events": ["after", "types", "queue"],
    "/v1/tasks/{task_id}/events": ["after"],
    "/v1/tasks/{task_id}": ["wait_seconds"],
    "/v1/usage": ["from", "to", "group_by", "queue", "workflow", "min_seq"],
}
"""The parameters each GET route reads, so most hostile values meet a parser."""
TOKEN_TEXT = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")


def _cursor(*position: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


hostile_query_values: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS),
    st.integers().map(str),
    st.text(max_size=40),  # NUL, newlines, any script
    st.builds(lambda token, tail: token + tail, TOKEN_TEXT, st.sampled_from(["\n", "\x00", "\r\n", " ", "\t"])),
    st.sampled_from(["pending", "default", "TaskSubmitted", "TaskSubmitted,,x", ",,,", "true", "yes", "day,model"]),
    st.text(alphabet="ab,", min_size=4_000, max_size=10_000),
    # cursors: not base64, base64 of anything, forged positions
    st.binary(max_size=64).map(lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")),
    st.builds(
        _cursor,
        st.sampled_from(["2025-01-01T00:00:00Z", "2025-01-01T00:00:00", "0001-01-01T00:00:00+01:00", "x", "9" * 30]),
        st.sampled_from(["a", "a\x00b", "x" * 100, "A B", ""]),
    ),
)


def hostile_query(names: list[str]) -> st.SearchStrategy[str]:
    """A query string of hostile values, mostly for the parameters ``names``."""
    return st.one_of(
        # name=value pairs, names known or not, perhaps repeated, percent-encoded as a client would
        st.lists(
            st.tuples(st.sampled_from(names) | st.text(max_size=12), hostile_query_values), min_size=1, max_size=4
        ).map(lambda pairs: "?" + urlencode(pairs)),
        # one parameter given twice
        st.builds(
            lambda name, value: f"?{name}={quote(value)}&{name}={quote(value)}",
            st.sampled_from(names),
            hostile_query_values,
        ),
        # raw query strings no client library would send
        st.sampled_from(["?", "?&&", "?=", "?=&=x", "?limit", "?limit=%zz", "?queue=%00", "?after=%ff%fe", "?%00=1"]),
        st.text(alphabet=string.printable, max_size=60).map(lambda text: "?" + quote(text, safe="=&%")),
    )


def _header_bytes(text: str) -> bytes | None:
    """What an HTTP/1.1 client may send as a header value: no control characters, no blank at either end."""
    raw = text.strip(" \t").encode()
    return None if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in raw) else raw


hostile_header_values: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS).map(_header_bytes).filter(lambda raw: raw is not None),  # type: ignore[arg-type]
    st.text(max_size=60).map(_header_bytes).filter(lambda raw: raw is not None),  # type: ignore[arg-type]
    st.binary(max_size=40).map(lambda raw: bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip(b" ")),
    st.integers(1_000, 9_000).map(lambda n: b"x" * n),
)


@st.composite
def hostile_headers(draw: st.DrawFn, target: Target, *, odd: int) -> dict[str, str | bytes]:
    """The admin's key, or (one time in ``odd``) an Authorization that is no valid credential; perhaps a
    hostile Last-Event-ID and Idempotency-Key besides."""
    key = target.admin_key
    headers: dict[str, str | bytes] = {}
    if not draw(one_in(odd)):
        headers["Authorization"] = draw(st.sampled_from([f"Bearer {key}", f"bearer {key}", f"Bearer   {key}"]))
    else:
        unknown = draw(TOKEN_TEXT)
        authorization = draw(
            st.sampled_from(
                [
                    None,
                    b"",
                    b"Bearer",
                    b"Basic dXNlcjpwYXNz",
                    f"Bearer cp_{unknown}_secret".encode(),
                    f"Bearer cp_{unknown}_".encode(),
                    b"Bearer cp__secret",
                    b"Bearer cp_UPPER-case_secret",
                    f"Bearer cp_{'a' * 64}_secret".encode(),
                    f"Bearer {key}x".encode(),
                    f"Bearer {key} {key}".encode(),
                    f"Token {key}".encode(),
                    b"Bearer a.b.c",
                    b"Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
                    "Bearer cp_\u00e9t\u00e9_secret".encode(),
                    b"Bearer " + b"x" * 8_000,
                ]
            )
            | hostile_header_values
        )
        if authorization is not None:
            headers["Authorization"] = authorization
    if draw(one_in(4)):
        headers["Last-Event-ID"] = draw(hostile_header_values)
    if draw(one_in(6)):
        headers["Idempotency-Key"] = draw(hostile_header_values)
    return headers


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True one time in ``n``; False is what hypothesis tries first and shrinks to."""
    return st.sampled_from([False] * (n - 1) + [True])


# --- what is checked -------------------------------------------------------------------------------------


@dataclass
class Tally:
    by_status: Counter[int] = field(default_factory=Counter)
    by_shape: Counter[tuple[str, int]] = field(default_factory=Counter)
    routes: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejected: int = 0
    rejected_that_appended: int = 0
    denials_recorded: int = 0  # 403s of the submit policy: the log records those by design

    @property
    def requests(self) -> int:
        return sum(self.by_status.values())

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.by_status.items() if status >= 500)


class Campaign:
    def __init__(self, stack: Stack, target: Target, client: httpx.AsyncClient) -> None:
        self.stack, self.target, self.client = stack, target, client
        self.tally = Tally()

    async def commands_appended_since(self, seq: int) -> list[RecordedEvent]:
        """Messages stored on the campaign org's subjects after ``seq``, except timers firing."""
        stored = await self.stack.services.store.read_subject(f"*.{self.target.org}.>", after_seq=seq)
        return [r for r in stored if not (r.subject.startswith("cp.") and r.actor == TIMER_ACTOR)]

    async def send(self, request: BadRequest) -> httpx.Response:
        """Sends one request; asserts no 5xx, and for a refusal a problem+json and nothing appended."""
        before = await self.stack.services.store.last_seq()
        response = await self.exchange(request)
        status = response.status_code
        self.tally.by_status[status] += 1
        self.tally.by_shape[(request.shape, status)] += 1
        self.tally.routes[(request.method, request.route)] += 1
        assert status < 500, f"{request!r} -> {status} {response.text[:2000]}"
        if status < 400:
            return response
        self.tally.rejected += 1
        content_type = response.headers.get("content-type", "")
        assert content_type.startswith("application/problem+json"), (request, content_type, response.text)
        problem = response.json()
        assert problem["status"] == status, problem
        assert problem["title"], problem
        assert problem["detail"], problem
        appended = await self.commands_appended_since(before)
        if _is_recorded_policy_denial(request, status, appended):
            self.tally.denials_recorded += 1
            return response
        if appended:
            self.tally.rejected_that_appended += 1
        assert not appended, f"{request!r} was refused with {status} ({problem['detail']}) but appended {appended}"
        return response

    async def exchange(self, request: BadRequest) -> httpx.Response:
        """The response; for an event stream that opens, its first message, then the stream is closed."""
        if request.method == "GET" and request.route.endswith("/events"):
            async with self.client.stream("GET", request.path, headers=request.headers) as streamed:
                if streamed.status_code != 200:
                    await streamed.aread()
                    return streamed
                chunks = streamed.aiter_bytes()
                try:
                    first = await anext(chunks)
                finally:
                    await chunks.aclose()
                assert first.startswith(b": connected"), (request, first)
                return httpx.Response(200, headers=streamed.headers, content=first)
        return await self.client.request(
            request.method,
            request.path,
            content=_chunks(request.content) if request.chunked else request.content,
            headers=request.headers,
        )


def _statuses(tally: Tally, shape: str) -> dict[int, int]:
    return {status: n for (shape_, status), n in sorted(tally.by_shape.items()) if shape_ == shape}


def _is_recorded_policy_denial(request: BadRequest, status: int, appended: list[RecordedEvent]) -> bool:
    """A submit the policy denies is answered 403 and recorded as TaskSubmissionDenied, for audit."""
    return (
        (request.method, request.route, status) == ("POST", "/v1/tasks", 403)
        and len(appended) == 1
        and isinstance(appended[0].event, TaskSubmissionDenied)
    )


async def _chunks(content: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(content), CHUNK_BYTES):
        yield content[start : start + CHUNK_BYTES]


def run_in_thread(
    loop: asyncio.AbstractEventLoop,
    examples: int,
    requests: st.SearchStrategy[BadRequest],
    send: Callable[[BadRequest], Coroutine[Any, Any, Any]],
) -> None:
    """Hypothesis draws in this thread; each request runs on the loop the gateway serves on."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,  # the tree is shared: a saved failure would replay in everyone's run
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(request=requests)
    def one_request(request: BadRequest) -> None:
        asyncio.run_coroutine_threadsafe(send(request), loop).result(REQUEST_TIMEOUT_SECONDS)

    one_request()


async def test_bad_input_to_every_command_gets_no_5xx_and_a_refusal_appends_nothing(
    stack: Stack, target: Target
) -> None:
    routes = state_changing_routes(stack)
    assert len(routes) >= 19, routes
    limit = stack.services.limits.max_body_bytes
    skipped_before = dict(stack.projector.skipped)
    async with httpx.AsyncClient(base_url=stack.url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        campaign = Campaign(stack, target, client)

        # The check sees an append: a valid submit shows up, and only it.
        before = await stack.services.store.last_seq()
        accepted = await client.post(
            "/v1/tasks", json={"type": "probe", "queue": QUEUE}, headers={"Authorization": f"Bearer {target.admin_key}"}
        )
        assert accepted.status_code == 201, accepted.text
        assert [r.seq for r in await campaign.commands_appended_since(before)] == [accepted.json()["seq"]]

        requests = bad_requests(routes, target, limit)
        await asyncio.to_thread(run_in_thread, asyncio.get_running_loop(), EXAMPLES, requests, campaign.send)

    tally = campaign.tally
    print(
        f"\nbad-input campaign: {tally.requests} requests to {len(tally.routes)} of {len(routes)} state-changing "
        f"routes; 5xx seen: {tally.server_errors}; refused: {tally.rejected}, of which appended: "
        f"{tally.rejected_that_appended} (submit-policy denials recorded by design: {tally.denials_recorded})\n"
        f"  by status: {dict(sorted(tally.by_status.items()))}\n"
        + "".join(f"  {shape}: {_statuses(tally, shape)}\n" for shape in sorted(set(SHAPES)))
    )
    assert tally.requests >= EXAMPLES
    if 10 * len(routes) <= EXAMPLES:  # enough requests that every route must have had some
        assert set(tally.routes) == set(routes), f"never sent to: {set(routes) - set(tally.routes)}"
    # Whatever got accepted must also be projectable: no read model may stall on or skip an event.
    async with asyncio.timeout(60):
        await stack.projector.run_until_caught_up()
    assert stack.projector.skipped == skipped_before


async def test_hostile_queries_and_headers_to_every_read_get_no_5xx_and_append_nothing(
    stack: Stack, target: Target
) -> None:
    routes = state_changing_routes(stack, READING)
    assert len(routes) >= 12, routes
    async with httpx.AsyncClient(base_url=stack.url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        campaign = Campaign(stack, target, client)
        requests = bad_reads(routes, target)
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(run_in_thread, loop, EXAMPLES, requests, campaign.send)
        # Hypothesis draws routes unevenly and may leave one out of a small campaign: each gets some.
        for route in sorted(set(routes) - set(campaign.tally.routes)):
            await asyncio.to_thread(run_in_thread, loop, 5, bad_reads([route], target), campaign.send)
    tally = campaign.tally
    print(
        f"\nhostile-query campaign: {tally.requests} requests to {len(tally.routes)} of {len(routes)} GET routes; "
        f"5xx seen: {tally.server_errors}; refused: {tally.rejected}, of which appended: "
        f"{tally.rejected_that_appended}\n  by status: {dict(sorted(tally.by_status.items()))}\n"
    )
    assert tally.requests >= EXAMPLES
    assert tally.server_errors == 0
    assert tally.rejected_that_appended == 0
    if 10 * len(routes) <= EXAMPLES:
        assert set(tally.routes) == set(routes), f"never sent to: {set(routes) - set(tally.routes)}"
    # Not all refused: the valid credential and plain values get through too.
    assert tally.by_status[200] > 0 and tally.by_status[422] > 0, tally.by_status


def submit(target: Target, content: bytes, shape: str) -> BadRequest:
    headers = {"Authorization": f"Bearer {target.admin_key}", "Content-Type": "application/json"}
    return BadRequest("POST", "/v1/tasks", "/v1/tasks", shape, content, headers, chunked=False)


def submit_of_size(target: Target, size: int) -> BadRequest:
    """A valid submit of exactly ``size`` bytes: the filler is the payload."""
    skeleton = json.dumps({"type": "deploy", "queue": QUEUE, "payload": ""}).encode()
    content = skeleton.replace(b'"payload": ""', b'"payload": "' + b"x" * (size - len(skeleton)) + b'"')
    assert len(content) == size
    return submit(target, content, "at limit")


async def test_bodies_that_got_a_503_before_get_a_4xx_and_append_nothing(stack: Stack, target: Target) -> None:
    """What the campaign found: each of these was answered 503 (an unexpected exception) before."""
    limit = stack.services.limits.max_body_bytes
    found: list[tuple[BadRequest, set[int]]] = [
        # bytes that are not UTF-8 inside a JSON string: msgspec raises UnicodeDecodeError
        (submit(target, b'{"type": "deploy", "payload": "\xff\xfe"}', "not utf-8"), {400}),
        (submit(target, b'{"type": "deploy", "payload": {"\x80": 1}}', "not utf-8"), {400}),
        # nesting deeper than msgspec's recursion guard: RecursionError (now deeper than 64 is a 422)
        (submit(target, b'{"type": "deploy", "payload": ' + _nested(5000, "list") + b"}", "deep"), {422}),
        (submit(target, b'{"type": "deploy", "payload": ' + _nested(5000, "dict") + b"}", "deep"), {422}),
        # a body within the limit whose event is not: nats-py's MaxPayloadError
        (submit_of_size(target, limit), {413}),
        (submit_of_size(target, limit - 100), {413}),
    ]
    # Around the depths where msgspec, or the NUL check walking the decoded value, runs out of stack.
    for depth in range(100, 1001, 20):
        deep_nul = b"[" * depth + b'"\\u0000"' + b"]" * depth
        found.append((submit(target, b'{"type": "deploy", "payload": ' + deep_nul + b"}", "deep"), {400, 422}))
    async with httpx.AsyncClient(base_url=stack.url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        campaign = Campaign(stack, target, client)
        for request, expected in found:
            response = await campaign.send(request)
            assert response.status_code in expected, (request, response.text)


async def test_a_body_just_under_the_limit_gets_a_4xx_and_the_gateway_keeps_its_log_connection(
    tmp_path: Path, database_url: str
) -> None:
    """Bodies from the limit down to 2 KB below it: one whose event fits a NATS message only without its
    headers must be refused like the others, not make the server close the gateway's connection. On a
    gateway of its own, since that connection does not come back."""
    async with own_stack(tmp_path / "nats", database_url) as stack:
        stack.services.limits.max_block_ms = 100
        org = f"bad{new_id()[-12:]}"
        keys = await seed_org(stack.services.handler, org, ROLES)
        await stack.projector.run_until_caught_up()
        target = Target(org, keys["admin"], ids={}, lease={})
        limit = stack.services.limits.max_body_bytes
        async with httpx.AsyncClient(base_url=stack.url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
            campaign = Campaign(stack, target, client)
            for below in range(0, 2048, 16):
                await campaign.send(submit_of_size(target, limit - below))
        assert stack.services.store.nc.is_connected
