"""Small helpers every route uses: who is asking, the body as a typed struct, ids for idempotent
retries, and JSON out."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from itertools import accumulate
from typing import Any, TypeVar

import msgspec
import nats.errors
from starlette.requests import Request
from starlette.responses import Response

from application.forms import holds_nul
from application.idempotency import derived_id
from application.principal import Principal
from core import telemetry
from core.domain.commands import Command
from core.domain.ids import validate_token
from core.log.handler import Outcome
from gateway.console.sessions import SESSION_COOKIE
from gateway.problems import Problem
from gateway.queries import MAX_SEQ, Query, ReadAfter, expected, whole_numbers
from gateway.services import Services

T = TypeVar("T")
Q = TypeVar("Q", bound=Query)
IDEMPOTENCY_HEADER = "idempotency-key"
READ_WAIT_SECONDS = 5.0


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def principal(request: Request, permission: str) -> Principal:
    """Who asks, if they may. Throttled twice: per client address before the credential is looked at
    (each refused credential takes a token, so refusals cannot be had faster than the limit), then per
    credential."""
    svc = services(request)
    address = client_address(request)
    if (wait := svc.failed_auth.blocked_for(address)) > 0:
        raise Problem(
            429,
            f"too many requests from this address had no valid credential; retry in {wait:.2f} s",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    try:
        who = await _credential(request, svc)
    except Problem as exc:
        if exc.status == 401:
            svc.failed_auth.retry_after(address)
        raise
    telemetry.org.set(who.org)  # the rest of the request's log lines name the org (reset with the request's task)
    wait = svc.rate_limiter.retry_after(who.credential_id)
    if wait > 0:
        raise Problem(429, f"rate limit exceeded; retry in {wait:.2f} s", headers={"Retry-After": str(int(wait) + 1)})
    who.require(permission)
    return who


def client_address(request: Request) -> str:
    """The peer's address (a proxy's, unless uvicorn is told to trust its forwarding headers)."""
    return request.client.host if request.client else ""


async def body(request: Request, kind: type[T], *, optional: bool = False) -> T:
    """Decode the JSON body into ``kind``: 413 over the size limit, 400 if it is not JSON, 422 if a
    field is wrong or arrays and objects nest too deep. An empty body is ``{}`` when every field has a
    default (``optional``)."""
    limits = services(request).limits
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared[:20]) > limit:
        raise Problem(413, f"the body is {declared[:20]} bytes or more; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if optional:
            raw = b"{}"
        else:
            raise Problem(400, "a JSON body is required")
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", "") and not content_type.endswith("+json"):
        raise Problem(415, f"send application/json, not {content_type}")
    if json_depth(raw) > limits.max_json_depth:  # deeper would decode here, but not from the log
        raise Problem(422, f"arrays and objects nest more than {limits.max_json_depth} deep in the body; flatten it")
    try:
        decoded = msgspec.json.decode(raw, type=kind)
        has_nul = b"\\u0000" in raw and holds_nul(msgspec.to_builtins(decoded))
    except msgspec.ValidationError as exc:
        if str(exc).startswith("Expected `object`") and " - at `$" not in str(exc):  # the body itself, not a field
            raise Problem(400, f"the body must be a JSON object: {exc}") from exc
        raise
    except UnicodeDecodeError as exc:  # msgspec's error for bytes that are not UTF-8 inside a string
        raise Problem(400, f"the body is not valid UTF-8: {exc}") from exc
    if has_nul:
        raise Problem(422, "strings may not contain the NUL character (\\u0000)")
    return decoded


async def _credential(request: Request, svc: Services) -> Principal:
    """The bearer credential; for reads without one, a console session's cookie (the console's live
    updates read the SSE feeds this way). Writes always need the bearer header: a cookie alone could be
    sent by another site's form, and the console's own writes go through its CSRF-checked routes."""
    authorization = request.headers.get("authorization")
    if authorization is None and request.method in ("GET", "HEAD") and (token := request.cookies.get(SESSION_COOKIE)):
        session = await svc.sessions.find(token)
        if session is None:
            raise Problem(401, "the console session has ended; sign in again at /console")
        return session.principal()
    return await svc.auth.authenticate(authorization)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``raw``, found without decoding or recursing:
    strings are cut out (a bracket in one is text), then the brackets left are counted. For text that
    is not JSON the number means little, and the decoder refuses that text anyway."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def path_id(request: Request, name: str, what: str) -> str:
    """A path id that is not a valid token names nothing: 404, and it never reaches a subject."""
    value = request.path_params[name]
    try:
        valid = validate_token(value, what)
    except ValueError as exc:
        raise Problem(404, f"{what} {value!r} not found") from exc
    if what == "task":
        telemetry.task_id.set(valid)  # on the request's log lines from here on
    return valid


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not valid_idempotency_key(key):
        raise Problem(400, "Idempotency-Key must be 1 to 255 characters")
    return key


def valid_idempotency_key(key: str) -> bool:
    return 1 <= len(key) <= 255


def command_id(request: Request, who: Principal, *scope: str) -> str | None:
    return keyed_command_id(who, idempotency_key(request), *scope)


async def handled(request: Request, who: Principal, command: Command, *scope: str) -> Outcome:
    """``command`` handled for ``who``, as the command its request's ``Idempotency-Key`` stands for in
    ``scope``: the request sent again records nothing new and answers the same outcome."""
    return await services(request).handler.handle(
        who.org, command, actor=who.actor, command_id=command_id(request, who, *scope)
    )


def keyed_command_id(who: Principal, key: str | None, *scope: str) -> str | None:
    """The command id an idempotency key stands for, per org, credential and scope (None without a key):
    the same key sent again, as a header or from a form, names the same command."""
    return None if key is None else derived_id(who.org, who.credential_id, key, *scope)


def json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # msgspec, not orjson: client payloads may hold integers beyond 64 bits, which orjson refuses.
    return Response(_encoder.encode(data), status_code=status, media_type="application/json", headers=headers)


_encoder = msgspec.json.Encoder()


async def read_after(request: Request, projection: str, who: Principal) -> None:
    """Answer from a read model that has projected the caller's own newest write through this gateway
    (read your writes, lists included), or at least sequence N with ``?min_seq=N`` (another client's
    writes: every state-changing response carries its ``seq``). A sequence the log has not reached is a
    422: waiting could not make it true."""
    svc = services(request)
    own = svc.handler.last_write_of(who.actor.id)
    asked = query(request, ReadAfter).min_seq
    min_seq = max(own, asked or 0)
    if min_seq == 0:
        return
    if await svc.read_model.checkpoint(projection) >= min_seq:
        return
    with contextlib.suppress(nats.errors.Error, TimeoutError):  # the log unreachable: wait as before
        if min_seq > (last := await svc.store.last_seq()):
            raise Problem(
                422, f"min_seq {min_seq} is beyond the log's last sequence {last}; send a seq a response gave"
            )
    if not await svc.read_model.wait_for(projection, min_seq, timeout=READ_WAIT_SECONDS):
        raise Problem(
            503, f"the read model has not reached sequence {min_seq} yet; retry", headers={"Retry-After": "1"}
        )


def query(request: Request, kind: type[Q]) -> Q:
    """The query string as ``kind`` (one of gateway/queries.py), checked as a body is: 422 saying which
    parameter is wrong, for a value of the wrong type or out of bounds, one holding NUL, or one given
    twice. An empty value is the same as none; parameters ``kind`` does not name are ignored."""
    return typed_text(request.query_params.multi_items(), kind)


def typed_text(items: Iterable[tuple[str, str]], kind: type[Q]) -> Q:
    """Named text values (a query string's, or a header's under a parameter's name) as ``kind``."""
    fields, numbers = set(kind.__struct_fields__), whole_numbers(kind)
    values: dict[str, str | int] = {}
    seen: set[str] = set()
    for name, value in items:
        if name not in fields:
            continue
        if name in seen:
            raise Problem(422, f"query parameter {name}: given more than once; give it once")
        seen.add(name)
        if "\x00" in value:
            raise Problem(422, f"query parameter {name}: may not contain the NUL character")
        if not value:
            continue
        # A number is ASCII digits (a few more than any bound, so int() stays cheap); anything else stays
        # text, which the integer field refuses.
        values[name] = (
            int(value) if name in numbers and value.isascii() and value.isdigit() and len(value) <= 20 else value
        )
    try:
        return msgspec.convert(values, kind)
    except msgspec.ValidationError as exc:
        if (at := _AT_FIELD.search(str(exc))) and (name := at[1]) in values:
            shown = str(values[name])[:64]
            raise Problem(422, f"query parameter {name} must be {expected(kind, name)}, not {shown!r}") from None
        raise Problem(422, f"invalid query: {exc}") from None  # a check across parameters, or of a cursor


_AT_FIELD = re.compile(r" - at `\$\.(\w+)`$")


def path_number(request: Request, name: str, what: str) -> int:
    """A path segment that stands for a whole number (a version): one that is not a decimal number
    from 0 to 2**63-1 names nothing, 404."""
    value = request.path_params[name]
    if not (value.isascii() and value.isdigit() and len(value) <= len(str(MAX_SEQ)) and int(value) <= MAX_SEQ):
        raise Problem(404, f"{what} {value[:64]!r} not found")
    return int(value)
