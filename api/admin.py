"""Operators' reports: model usage and its cost (``rag/learners/usage.py``), for
administrators only, cursor-paginated like every list."""

from __future__ import annotations

from datetime import date
from typing import Annotated

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import Parameter

from api.errors import error_responses
from api.identity import current_identity
from api.limits import reading
from api.lists import PageCursor, PageLimit
from rag.learners.history import DEFAULT_LIMIT, check_limit
from rag.learners.usage import Group, UsageRow, report, report_range
from rag.platform.errors import Forbidden
from rag.protection.auth import Identity


class UsagePage(msgspec.Struct):
    items: list[UsageRow]
    next_cursor: str | None
    group: Group
    since: date
    until: date
    #: Models with tokens in the range that MODEL_PRICES does not price (costed at 0).
    unpriced: list[str]


@get(
    "/v1/admin/usage",
    dependencies=reading(current_identity),
    responses=error_responses(400, 401, 403, 422, 429, 503),
    summary="Model tokens and their cost by user, course or day (administrators)",
)
async def usage(
    user: NamedDependency[Identity],
    state: State,
    group: Annotated[
        Group, Parameter(description="user, course or day (newest first); default course")
    ] = "course",
    since: Annotated[
        date | None, Parameter(description="First day (UTC), default 29 days before until")
    ] = None,
    until: Annotated[date | None, Parameter(description="Last day (UTC), default today")] = None,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> UsagePage:
    if not user.admin:
        raise Forbidden("the usage report is for administrators")
    check_limit(limit)
    start, end = report_range(since, until)
    items, next_cursor, unpriced = await report(
        state.res.db,
        group=group,
        since=start,
        until=end,
        prices=state.settings.model_prices,
        limit=limit,
        cursor=cursor or None,
    )
    return UsagePage(items, next_cursor, group, start, end, unpriced)


ROUTES = [usage]
