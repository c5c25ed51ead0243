"""Small helpers every route uses: who is asking, the body as a typed struct, ids for idempotent
retries, and JSON out."""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core.ids import validate_token
from gateway.auth import Principal
from gateway.console.sessions import SESSION_COOKIE
from gateway.problems import Problem
from gateway.services import Services

T = TypeVar("T")
IDEMPOTENCY_HEADER = "idempotency-key"
READ_WAIT_SECONDS = 5.0


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def principal(request: Request, permission: str) -> Principal:
    svc = services(request)
    who = await _credential(request, svc)
    wait = svc.rate_limiter.retry_after(who.credential_id)
    if wait > 0:
        raise Problem(429, f"rate limit exceeded; retry in {wait:.2f} s", headers={"Retry-After": str(int(wait) + 1)})
    who.require(permission)
    return who


async def body(request: Request, kind: type[T], *, optional: bool = False) -> T:
    """Decode the JSON body into ``kind``: 413 over the size limit, 400 if it is not JSON, 422 if a
    field is wrong. An empty body is ``{}`` when every field has a default (``optional``)."""
    limit = services(request).limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"the body is {declared} bytes; the limit is {limit}")
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
    try:
        decoded = msgspec.json.decode(raw, type=kind)
        holds_nul = b"\\u0000" in raw and _holds_nul(msgspec.to_builtins(decoded))
    except msgspec.ValidationError as exc:
        if str(exc).startswith("Expected `object`") and " - at `$" not in str(exc):  # the body itself, not a field
            raise Problem(400, f"the body must be a JSON object: {exc}") from exc
        raise
    except UnicodeDecodeError as exc:  # msgspec's error for bytes that are not UTF-8 inside a string
        raise Problem(400, f"the body is not valid UTF-8: {exc}") from exc
    except RecursionError as exc:  # msgspec's (and _holds_nul's) error for arrays or objects nested too deep
        raise Problem(400, "the body nests arrays or objects too deeply; flatten it") from exc
    if holds_nul:
        raise Problem(422, "strings may not contain the NUL character (\\u0000)")
    return decoded


async def _credential(request: Request, svc: Services) -> Principal:
    """The bearer credential; for reads without one, a console session's cookie (the console's live
    updates read the SSE feeds this way). Writes always need the bearer header: a cookie alone could be
    sent by another site's form, and the console's own writes go through its CSRF-checked routes."""
    authorization = request.headers.get("authorization")
    token = request.cookies.get(SESSION_COOKIE)
    if authorization is None and token and request.method in ("GET", "HEAD"):
        session = await svc.sessions.find(token)
        if session is None:
            raise Problem(401, "the console session has ended; sign in again at /console")
        return session.principal()
    return await svc.auth.authenticate(authorization)


def _holds_nul(value: Any) -> bool:
    """PostgreSQL cannot store NUL in text or JSON, so no string anywhere in a body may hold one."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


def path_id(request: Request, name: str, what: str) -> str:
    """A path id that is not a valid token names nothing: 404, and it never reaches a subject."""
    value = request.path_params[name]
    try:
        return validate_token(value, what)
    except ValueError as exc:
        raise Problem(404, f"{what} {value!r} not found") from exc


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 1 <= len(key) <= 255:
        raise Problem(400, "Idempotency-Key must be 1 to 255 characters")
    return key


def derived_id(*parts: str) -> str:
    """A stable token from the parts (org, credential, key, ...), so a retried request maps to the same
    command and aggregate ids and returns the original outcome."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def command_id(request: Request, who: Principal, *scope: str) -> str | None:
    key = idempotency_key(request)
    return None if key is None else derived_id(who.org, who.credential_id, key, *scope)


def json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # msgspec, not orjson: client payloads may hold integers beyond 64 bits, which orjson refuses.
    return Response(_encoder.encode(data), status_code=status, media_type="application/json", headers=headers)


_encoder = msgspec.json.Encoder()


async def read_after(request: Request, projection: str) -> None:
    """``?min_seq=N``: answer from a read model that has projected at least sequence N (read your writes:
    every state-changing response carries its ``seq``)."""
    raw = request.query_params.get("min_seq")
    if raw is None:
        return
    if not raw.isdigit():
        raise Problem(422, "min_seq must be a non-negative integer")
    if not await services(request).read_model.wait_for(projection, int(raw), timeout=READ_WAIT_SECONDS):
        raise Problem(503, f"the read model has not reached sequence {raw} yet; retry", headers={"Retry-After": "1"})


def limit_param(raw: str | None) -> int:
    if raw is None:
        return 100
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise Problem(422, "limit must be an integer from 1 to 500")
    return int(raw)
