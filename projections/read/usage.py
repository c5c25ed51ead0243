"""Reads of the org's recorded LLM calls: sums per day and model, and a day's spend (for quotas)."""

from __future__ import annotations

from datetime import date
from typing import Any

from projections.read.scope import Reads, Where

USAGE_GROUPS = ("day", "model")
"""What usage can be grouped by, in the order items are sorted."""
MAX_USAGE_DAYS = 366


def check_usage_query(start: date, end: date, group_by: tuple[str, ...]) -> None:
    """Raises ValueError, saying what to send instead, unless :meth:`UsageReads.usage` can answer."""
    unknown = [key for key in group_by if key not in USAGE_GROUPS]
    if unknown or not group_by:
        wrong = f"unknown group_by {', '.join(map(repr, unknown))}" if unknown else "group_by is empty"
        raise ValueError(f"{wrong}: send a comma-separated list of {', '.join(USAGE_GROUPS)}")
    if start > end:
        raise ValueError(f"from ({start}) is after to ({end})")
    days = (end - start).days + 1
    if days > MAX_USAGE_DAYS:
        raise ValueError(f"from {start} to {end} is {days} days; ask for at most {MAX_USAGE_DAYS} at a time")


class UsageReads(Reads):
    async def spend_on(self, org: str, day: date) -> tuple[int, float]:
        """Prompt and completion tokens, and USD, the org's recorded LLM calls used on ``day`` (UTC)."""
        rows = await self._fetch(
            org,
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens, coalesce(sum(cost_usd), 0) AS cost"
            " FROM usage WHERE org_id = $1 AND day = $2",
            org,
            day,
        )
        return int(rows[0]["tokens"]), float(rows[0]["cost"])

    async def usage(
        self,
        org: str,
        *,
        start: date,
        end: date,
        group_by: tuple[str, ...] = USAGE_GROUPS,
        queue: str | None = None,
        workflow: str | None = None,
    ) -> list[dict[str, Any]]:
        """The org's recorded LLM calls from ``start`` to ``end`` (UTC days, both included), only those
        of tasks on ``queue`` and of tasks running the workflow named ``workflow`` when given: one item
        ``{day, model, calls, prompt_tokens, completion_tokens, cost_usd}`` per group, sorted by day then
        model. ``group_by`` names the keys grouped on (of :data:`USAGE_GROUPS`); a key it leaves out is
        None in every item (all the range's days, or all models, together). ``day`` is a ``date``,
        tokens are ints, ``cost_usd`` a float rounded to 6 decimals. Raises ValueError for an unknown or
        empty ``group_by``, ``start`` after ``end``, or more than :data:`MAX_USAGE_DAYS` days."""
        check_usage_query(start, end, group_by)
        keys = [key for key in USAGE_GROUPS if key in group_by]
        where = Where.matching(org, queue=queue, workflow=workflow)
        where.add("day BETWEEN {0} AND {1}", start, end)
        rows = await self._fetch(
            org,
            f"SELECT {'day' if 'day' in keys else 'NULL::date AS day'},"
            f" {'model' if 'model' in keys else 'NULL::text AS model'},"
            " sum(calls) AS calls, sum(prompt_tokens) AS prompt_tokens,"
            " sum(completion_tokens) AS completion_tokens, round(sum(cost_usd), 6) AS cost_usd"
            f" FROM usage WHERE {where} GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}",
            *where.args,
        )
        return [
            {
                "day": row["day"],
                "model": row["model"],
                "calls": int(row["calls"]),
                "prompt_tokens": int(row["prompt_tokens"]),
                "completion_tokens": int(row["completion_tokens"]),
                "cost_usd": float(row["cost_usd"]),
            }
            for row in rows
        ]
