"""Errors as RFC 9457 problem+json, mapped in one place: domain rejections by kind, body decoding
by msgspec's two error types, infrastructure outages as 503. Bad input never becomes a 5xx."""

from __future__ import annotations

import msgspec
import nats.errors
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from core.domain.errors import ConcurrencyExhausted, Rejected
from core.domain.ids import InvalidToken
from core.log.event_store import EventTooLarge, StoreError
from projections.read import DATABASE_UNAVAILABLE

PROBLEM_JSON = "application/problem+json"
_TITLES = {
    400: "Malformed request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid field values",
    429: "Too many requests",
    503: "Service unavailable",
}
_REJECTION_STATUS = {"not_found": 404, "conflict": 409, "forbidden": 403, "invalid": 422, "unavailable": 503}


class Problem(Exception):
    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def problem_response(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    title = _TITLES.get(status, "Error")
    body = {"type": f"https://controlplane.dev/problems/{status}", "title": title, "status": status, "detail": detail}
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def handle_problem(request: Request, exc: Exception) -> Response:
    if (described := describe(exc)) is None:
        raise exc  # not ours to explain: ObserveRequests logs it and answers 503
    return problem_response(*described)


def describe(exc: Exception) -> tuple[int, str, dict[str, str]] | None:
    """Status, detail and headers for an error the API explains; None for one it does not."""
    match exc:
        case Problem():
            return exc.status, exc.detail, exc.headers
        case ConcurrencyExhausted():
            return 409, f"{exc.detail}; retry the request", {}
        case Rejected():
            return _REJECTION_STATUS[exc.kind], exc.detail, {}
        case InvalidToken():
            return 404, str(exc), {}
        case msgspec.ValidationError():
            return 422, str(exc), {}
        case msgspec.DecodeError():
            return 400, f"the body is not valid JSON: {exc}", {}
        case EventTooLarge() | nats.errors.MaxPayloadError():  # a body under the limit, an event over it
            return 413, "the event this request would record exceeds the event log's message size limit; send less", {}
        case StoreError() | nats.errors.Error():
            return 503, f"the event log (NATS) is unavailable: {exc!r}", {"Retry-After": "1"}
        case _ if isinstance(exc, DATABASE_UNAVAILABLE):
            return (
                503,
                f"the read model (PostgreSQL) is unavailable: {exc!r}. Commands, claims and single-object "
                "reads (GET /v1/tasks/{id}) still work; lists and stats return once it is back",
                {"Retry-After": "5"},
            )
        case HTTPException():
            return exc.status_code, str(exc.detail), dict(exc.headers or {})
    return None
