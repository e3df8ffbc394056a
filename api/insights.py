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
    QuestionGroup,
    asked_questions,
    feedback,
    gaps,
    is_staff,
)
from rag.platform.errors import Forbidden
from rag.protection.auth import Identity

Since = Annotated[
    datetime | None,
    Parameter(
        description="Start of the period (ISO 8601 with a time zone); default 30 days "
        "before until. Ignored with a cursor, which carries the period."
    ),
]
Until = Annotated[
    datetime | None,
    Parameter(description="End of the period (exclusive); default now."),
]


Weak = Annotated[
    float | None,
    Parameter(
        description="Best similarity under which an answer counts as weak; default "
        "RELEVANCE_FLOOR + 0.1.",
        ge=0,
        le=1,
    ),
]


class QuestionPage(msgspec.Struct):
    items: list[QuestionGroup]
    next_cursor: str | None


class GapPage(msgspec.Struct):
    items: list[Gap]
    next_cursor: str | None


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


@get(
    "/v1/courses/{course_key:str}/insights/questions",
    dependencies=reading(current_identity),
    responses=_RESPONSES,
    summary="The most asked questions of a period, grouped by the semantic cache's clusters",
)
async def insight_questions(
    course_key: FromPath[str],
    user: NamedDependency[Identity],
    state: State,
    since: Since = None,
    until: Until = None,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> QuestionPage:
    check_limit(limit)
    course = await _staff_course(state, course_key, user)
    items, next_cursor = await asked_questions(
        state.res.db, course.id, limit=limit, since=since, until=until, cursor=cursor or None
    )
    return QuestionPage(items, next_cursor)


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
    since: Since = None,
    until: Until = None,
    below: Weak = None,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> GapPage:
    check_limit(limit)
    course = await _staff_course(state, course_key, user)
    threshold = below if below is not None else min(1.0, state.settings.relevance_floor + 0.1)
    items, next_cursor = await gaps(
        state.res.db,
        course.id,
        limit=limit,
        below=threshold,
        since=since,
        until=until,
        cursor=cursor or None,
    )
    return GapPage(items, next_cursor)


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
