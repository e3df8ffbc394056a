"""Usage and cost: model tokens by day, course, user and model, and daily token budgets.

Each stored answer adds its tokens to ``usage_daily`` in the transaction that stores
it (a repeated run stores nothing, so counts nothing), and, when a budget is set,
to two Redis counters of the day (the user's and the course's) that the API's
admission script reads in the same call as the rate limits
(``rag/protection/limits.py``). The counters are charged after the answer, so a
question admitted just under the budget may end a little over it: a budget bounds
spending to one answer's tokens past it, per concurrent question.

The admin report (``GET /v1/admin/usage``) sums ``usage_daily`` by user, course or
day over a range of days and prices the tokens with ``MODEL_PRICES``.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
import redis.exceptions

from rag.learners.history import decode_cursor, encode_cursor
from rag.platform.db import Conn, Database, fetch_all
from rag.platform.errors import InvalidInput
from rag.platform.redis import Redis
from rag.platform.settings import Settings

log = logging.getLogger("rag.usage")

Group = Literal["user", "course", "day"]
#: Longest range one report may sum.
MAX_DAYS = 366

ROLLUP_SQL = """
INSERT INTO usage_daily AS u (day, course_id, user_id, model, jobs, prompt_tokens,
                              completion_tokens)
VALUES ((now() AT TIME ZONE 'UTC')::date, %(course_id)s, %(user_id)s, %(model)s, 1,
        %(prompt)s, %(completion)s)
ON CONFLICT (day, course_id, user_id, model) DO UPDATE
   SET jobs = u.jobs + 1,
       prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
       completion_tokens = u.completion_tokens + excluded.completion_tokens
"""


def model_of(settings: Settings, provider_name: str) -> str:
    """The model an answer's tokens are counted under (the provider's name offline)."""
    return settings.chat_model if provider_name == "openai" else provider_name


async def record(
    conn: Conn, *, course_id: int, user_id: str, model: str, usage: dict[str, int]
) -> None:
    """Add one answer's tokens to today's row (call inside the storing transaction)."""
    await conn.execute(
        ROLLUP_SQL,
        {
            "course_id": course_id,
            "user_id": user_id,
            "model": model,
            "prompt": int(usage.get("prompt_tokens", 0)),
            "completion": int(usage.get("completion_tokens", 0)),
        },
    )


# --- budgets ------------------------------------------------------------------------


def budget_keys(user_id: str, course_id: int, day: date) -> tuple[str, str]:
    """The Redis counters of the user's and the course's tokens on ``day`` (UTC)."""
    stamp = day.strftime("%Y%m%d")
    return f"budget:tokens:user:{user_id}:{stamp}", f"budget:tokens:course:{course_id}:{stamp}"


def budgets_on(settings: Settings) -> bool:
    return settings.budget_user_daily_tokens > 0 or settings.budget_course_daily_tokens > 0


def today() -> date:
    return datetime.now(UTC).date()


async def charge_budgets(
    client: Redis, settings: Settings, *, user_id: str, course_id: int, usage: dict[str, int]
) -> None:
    """Add an answer's tokens to today's counters (one pipelined round trip; nothing
    when no budget is set or the answer used no tokens). A Redis failure is logged,
    not raised: the answer is stored, and the budget undercounts it."""
    tokens = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
    if not budgets_on(settings) or tokens <= 0:
        return
    try:
        async with client.pipeline(transaction=False) as pipe:
            for key in budget_keys(user_id, course_id, today()):
                pipe.incrby(key, tokens)
                pipe.expire(key, int(timedelta(days=2).total_seconds()))
            await pipe.execute()
    except redis.exceptions.RedisError as exc:
        log.warning("token budget not charged (%d tokens): %s", tokens, exc)


# --- the report ---------------------------------------------------------------------


class UsageRow(msgspec.Struct, frozen=True):
    #: The user id, the course key, or the day (YYYY-MM-DD).
    key: str
    jobs: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class UsageKey(msgspec.Struct, frozen=True, array_like=True, tag="u"):
    group: Group
    key: Annotated[str, msgspec.Meta(max_length=200)]


_KEY = {"user": "u.user_id", "course": "c.course_key", "day": "u.day::text"}
_SUMS = """
SELECT {key} AS key, sum(u.jobs)::bigint AS jobs,
       sum(u.prompt_tokens)::bigint AS prompt_tokens,
       sum(u.completion_tokens)::bigint AS completion_tokens,
       (sum(u.prompt_tokens * coalesce((%(prices)s::jsonb -> u.model ->> 'input')::float8, 0)
          + u.completion_tokens
            * coalesce((%(prices)s::jsonb -> u.model ->> 'output')::float8, 0))
        / 1e6)::float8 AS cost_usd
  FROM usage_daily u JOIN courses c ON c.id = u.course_id
 WHERE u.day BETWEEN %(since)s AND %(until)s {after}
 GROUP BY 1
 ORDER BY 1 {order}
 LIMIT %(limit)s
"""
UNPRICED_SQL = """
SELECT DISTINCT model FROM usage_daily
 WHERE day BETWEEN %(since)s AND %(until)s
   AND prompt_tokens + completion_tokens > 0
   AND NOT %(prices)s::jsonb ? model
 ORDER BY model
"""


class _Model(msgspec.Struct, frozen=True):
    model: str


def report_range(since: date | None, until: date | None) -> tuple[date, date]:
    """The days a report sums: ``until`` defaults to today, ``since`` to 29 days before."""
    end = until or today()
    start = since or end - timedelta(days=29)
    if start > end:
        raise InvalidInput(f"since ({start}) is after until ({end})")
    if (end - start).days >= MAX_DAYS:
        raise InvalidInput(f"a report covers at most {MAX_DAYS} days", details={"max": MAX_DAYS})
    return start, end


async def report(
    db: Database,
    *,
    group: Group,
    since: date,
    until: date,
    prices: dict[str, dict[str, float]],
    limit: int,
    cursor: str | None = None,
) -> tuple[list[UsageRow], str | None, list[str]]:
    """One page of sums by ``group`` (users and courses by key, days newest first),
    its next cursor, and the models with tokens in the range that have no price."""
    params: dict[str, Any] = {
        "since": since,
        "until": until,
        "prices": msgspec.json.encode(prices).decode(),
        "limit": limit + 1,
    }
    newest_first = group == "day"
    after = ""
    if cursor is not None:
        position = decode_cursor(cursor, UsageKey)
        if position.group != group:
            raise InvalidInput("this cursor belongs to another grouping: start again")
        params["after"] = position.key
        after = f"AND {_KEY[group]} {'<' if newest_first else '>'} %(after)s"
    query = _SUMS.format(key=_KEY[group], after=after, order="DESC" if newest_first else "ASC")
    async with db.connection() as conn:
        rows = await fetch_all(conn, UsageRow, query, params)
        unpriced = [m.model for m in await fetch_all(conn, _Model, UNPRICED_SQL, params)]
    items, next_key = rows[:limit], None
    if len(rows) > limit:
        next_key = encode_cursor(UsageKey(group, items[-1].key))
    return items, next_key, unpriced
