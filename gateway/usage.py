"""``GET /v1/usage``: the org's recorded LLM calls (calls, tokens, cost) per UTC day and model.

Query, all optional (an empty value is the same as none: what an HTML form sends for a blank field):

- ``from``, ``to``: UTC days as YYYY-MM-DD, both included, at most 366 days. Neither: the 30 days up
  to today (by the services' clock); only ``from``: up to today; only ``to``: the 30 days up to it.
- ``group_by``: a comma-separated list of ``day`` and ``model`` (default ``day,model``). Every item
  has the same keys; one that ``group_by`` leaves out is null, so ``group_by=model`` answers one item
  per model with ``"day": null`` for the whole range.
- ``queue``, ``workflow``: only the calls of tasks on that queue, or running the workflow of that name.
- ``min_seq``: answer from a usage projection that has folded at least that sequence.

Answer: ``{items: [{day, model, calls, prompt_tokens, completion_tokens, cost_usd}], from, to}``,
items sorted by day then model. :func:`usage_query` reads the parameters (the console's usage page
reads its own with it too) and ``ReadModel.usage`` is the query; bad parameters are a 422 that says
what to send."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, timedelta

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from core.domain.ids import InvalidToken, validate_token
from gateway.http import json, principal, read_after, services
from gateway.problems import Problem
from projections.read.usage import USAGE_GROUPS, check_usage_query

DEFAULT_DAYS = 30
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True)
class UsageQuery:
    """The arguments of ``ReadModel.usage`` that a request asks for."""

    start: date
    end: date
    group_by: tuple[str, ...]
    queue: str | None
    workflow: str | None


async def usage(request: Request) -> Response:
    who = await principal(request, "read")
    svc = services(request)
    query = usage_query(request.query_params, svc.clock().astimezone(UTC).date())
    await read_after(request, "usage", who)
    items = await svc.read_model.usage(
        who.org,
        start=query.start,
        end=query.end,
        group_by=query.group_by,
        queue=query.queue,
        workflow=query.workflow,
    )
    return json({"items": items, "from": query.start, "to": query.end})


def usage_query(params: QueryParams, today: date) -> UsageQuery:
    """The usage asked for by ``from``, ``to``, ``group_by``, ``queue`` and ``workflow`` (defaults as
    the module says, ``today`` being the UTC date now); raises a 422 :class:`Problem` saying what is
    wrong and what to send."""
    start, end = _day(params, "from"), _day(params, "to")
    if end is None:
        end = today
    if start is None:
        try:
            start = end - timedelta(days=DEFAULT_DAYS - 1)
        except OverflowError:  # a ``to`` in the first days of year 1
            start = date.min
    groups = _given(params, "group_by")
    group_by = USAGE_GROUPS if groups is None else tuple(key.strip() for key in groups.split(","))
    try:
        check_usage_query(start, end, group_by)
    except ValueError as exc:
        raise Problem(422, str(exc)) from None
    return UsageQuery(start, end, group_by, _token(params, "queue"), _token(params, "workflow"))


def _given(params: QueryParams, name: str) -> str | None:
    return params.get(name) or None


def _day(params: QueryParams, name: str) -> date | None:
    raw = _given(params, name)
    if raw is None:
        return None
    try:
        if not _DAY.fullmatch(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise Problem(422, f"{name} must be a date as YYYY-MM-DD (UTC), e.g. 2025-01-31; not {raw[:64]!r}") from None


def _token(params: QueryParams, name: str) -> str | None:
    raw = _given(params, name)
    if raw is None:
        return None
    try:
        return validate_token(raw, name)
    except InvalidToken as exc:  # elsewhere a bad token names nothing (404); here it is a bad field value
        raise Problem(422, str(exc)) from None
