"""Insight for a course's staff (an ``instructor`` enrollment, or an administrator):
the most asked questions, the gaps in the content, the feedback (``rag/learners/insights.py``).
Every list is cursor-paginated like the others (``api/lists.py``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, Parameter

from api.errors import error_responses
from api.identity import current_identity
from api.limits import reading
from api.lists import PageCursor, PageLimit
from rag.content.catalog import CourseRef
from rag.learners.history import DEFAULT_LIMIT, check_limit
from rag.learners.insights import (
    FeedbackItem,
    Gap,
    Kind,
    QuestionGroup,
    SummaryPage,
    Window,
    feedback,
    is_staff,
    summary_page,
)
from rag.platform.errors import Forbidden
from rag.protection.auth import Identity

WindowDays = Annotated[
    Window,
    Parameter(description="The window, in days: 1, 7 or 30 (the default)."),
]


class QuestionPage(msgspec.Struct):
    items: list[QuestionGroup]
    next_cursor: str | None
    window_days: int
    #: When the summaries were computed; null before the worker's first refresh.
    refreshed_at: datetime | None


class GapPage(msgspec.Struct):
    items: list[Gap]
    next_cursor: str | None
    window_days: int
    refreshed_at: datetime | None


class FeedbackPage(msgspec.Struct):
    items: list[FeedbackItem]
    next_cursor: str | None


async def _staff_course(state: State, course_key: str, caller: Identity) -> CourseRef:
    """The course, if the caller teaches it or administers the service; else 403 (the
    same for a course that exists and one that does not, once the key is valid)."""
    course: CourseRef = await state.catalog.resolve(course_key)
    if not caller.admin and not await is_staff(state.res.db, course.id, caller.user_id):
        raise Forbidden(f"insights on {course_key!r} are for the course's instructors")
    return course


_RESPONSES = error_responses(400, 401, 403, 404, 422, 429, 503)


async def _summary(
    state: State,
    course_key: str,
    caller: Identity,
    kind: Kind,
    window: Window,
    limit: int,
    cursor: str | None,
) -> SummaryPage:
    check_limit(limit)
    course = await _staff_course(state, course_key, caller)
    return await summary_page(
        state.res.db, course.id, kind, window=window, limit=limit, cursor=cursor or None
    )


@get(
    "/v1/courses/{course_key:str}/insights/questions",
    dependencies=reading(current_identity),
    responses=_RESPONSES,
    summary="The most asked questions of a window, grouped by the semantic cache's clusters",
)
async def insight_questions(
    course_key: FromPath[str],
    user: NamedDependency[Identity],
    state: State,
    window: FromQuery[WindowDays] = 30,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> QuestionPage:
    page = await _summary(state, course_key, user, "questions", window, limit, cursor)
    items = msgspec.convert(page.items, list[QuestionGroup])
    return QuestionPage(items, page.next_cursor, window, page.refreshed_at)


@get(
    "/v1/courses/{course_key:str}/insights/gaps",
    dependencies=reading(current_identity),
    responses=_RESPONSES,
    summary="Questions answered with weak or no evidence, grouped by the nearest topic",
)
async def insight_gaps(
    course_key: FromPath[str],
    user: NamedDependency[Identity],
    state: State,
    window: FromQuery[WindowDays] = 30,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> GapPage:
    page = await _summary(state, course_key, user, "gaps", window, limit, cursor)
    items = msgspec.convert(page.items, list[Gap])
    return GapPage(items, page.next_cursor, window, page.refreshed_at)


@get(
    "/v1/courses/{course_key:str}/insights/feedback",
    dependencies=reading(current_identity),
    responses=_RESPONSES,
    summary="The feedback on the course's answers, newest first",
)
async def insight_feedback(
    course_key: FromPath[str],
    user: NamedDependency[Identity],
    state: State,
    rating: FromQuery[Literal["up", "down"] | None] = None,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> FeedbackPage:
    check_limit(limit)
    course = await _staff_course(state, course_key, user)
    items, next_cursor = await feedback(
        state.res.db, course.id, limit=limit, rating=rating, cursor=cursor or None
    )
    return FeedbackPage(items, next_cursor)


ROUTES = [insight_questions, insight_gaps, insight_feedback]
