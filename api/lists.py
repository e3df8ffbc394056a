"""Cursor-paginated lists: the caller's chat sessions, a session's messages, a course's
topics; and one topic's text, which a citation links to.

Each page is ``{"items": [...], "next_cursor": str | null}``; pass ``next_cursor``
back as ``cursor`` for the next page (an empty ``cursor`` is the first page, like
none). ``limit`` is 1 to 100 (default 20); a
value outside that range, or a cursor this service did not write, is a 422.
The queries and the cursor format live in :mod:`rag.learners.history`.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, Parameter

from api.errors import error_responses
from api.identity import current_identity, current_user, require_enrollment
from api.limits import reading
from rag.content.topic_text import TopicText, read_topic
from rag.learners.history import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    CourseSummary,
    Message,
    SessionSummary,
    Topic,
    check_limit,
    list_courses,
    list_messages,
    list_sessions,
    list_topics,
)
from rag.platform.errors import Forbidden, NotFound
from rag.platform.redis import translated
from rag.protection.auth import Identity

#: The range is checked by ``check_limit`` (a 422 in our words); the schema states it.
PageLimit = Annotated[
    int,
    Parameter(
        description=f"Items per page, 1 to {MAX_LIMIT}; outside that range: 422.",
        schema_extra={"minimum": 1, "maximum": MAX_LIMIT},
    ),
]
PageCursor = Annotated[
    str | None,
    Parameter(
        description="The previous page's next_cursor. Absent or empty: the first page; "
        "a cursor this service did not write: 422."
    ),
]


class SessionPage(msgspec.Struct):
    items: list[SessionSummary]
    next_cursor: str | None


class MessagePage(msgspec.Struct):
    items: list[Message]
    next_cursor: str | None


class TopicPage(msgspec.Struct):
    items: list[Topic]
    next_cursor: str | None


class CoursePage(msgspec.Struct):
    items: list[CourseSummary]
    next_cursor: str | None


@get(
    "/v1/courses",
    dependencies=reading(current_identity),
    responses=error_responses(400, 401, 422, 429, 503),
    summary="The caller's enrolled courses by key (an administrator sees every course; "
    "so does anyone under DEV_AUTO_ENROLL, where the first question enrolls)",
)
async def courses(
    user: NamedDependency[Identity],
    state: State,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> CoursePage:
    check_limit(limit)
    items, next_cursor = await list_courses(
        state.res.db,
        user_id=user.user_id,
        admin=user.admin,
        limit=limit,
        cursor=cursor or None,
        auto_enroll=state.settings.dev_auto_enroll,
    )
    return CoursePage(items, next_cursor)


@get(
    "/v1/sessions",
    dependencies=reading(current_user),
    responses=error_responses(400, 401, 404, 422, 429, 503),
    summary="The caller's chat sessions in a course, most recently active first",
)
async def sessions(
    course_key: FromQuery[str],
    user: NamedDependency[str],
    state: State,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> SessionPage:
    check_limit(limit)
    course = await state.catalog.resolve(course_key)
    items, next_cursor = await list_sessions(
        state.res.db, user_id=user, course_id=course.id, limit=limit, cursor=cursor or None
    )
    return SessionPage(items, next_cursor)


@get(
    "/v1/sessions/{session_id:uuid}/messages",
    dependencies=reading(current_user),
    responses=error_responses(400, 401, 404, 422, 429, 503),
    summary="A session's messages, newest first",
)
async def messages(
    session_id: FromPath[uuid.UUID],
    user: NamedDependency[str],
    state: State,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> MessagePage:
    check_limit(limit)
    items, next_cursor = await list_messages(
        state.res.db, user_id=user, session_id=session_id, limit=limit, cursor=cursor or None
    )
    return MessagePage(items, next_cursor)


@get(
    "/v1/courses/{course_key:str}/topics",
    dependencies=reading(current_user),
    responses=error_responses(400, 401, 404, 422, 429, 503),
    summary="A course's topics in module, then position order",
)
async def topics(
    course_key: FromPath[str],
    user: NamedDependency[str],
    state: State,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> TopicPage:
    # Identified like every other course route, though the list is the same for everyone.
    check_limit(limit)
    course = await state.catalog.resolve(course_key)
    items, next_cursor = await list_topics(
        state.res.db, course_id=course.id, limit=limit, cursor=cursor or None
    )
    return TopicPage(items, next_cursor)


@get(
    "/v1/courses/{course_key:str}/topics/{topic_key:str}",
    dependencies=reading(current_identity),
    responses=error_responses(400, 401, 403, 404, 422, 429, 503),
    summary="A topic's text, rendered to safe HTML with anchored headings (what citations open)",
)
async def topic_text(
    course_key: FromPath[str],
    topic_key: FromPath[str],
    user: NamedDependency[Identity],
    state: State,
) -> TopicText:
    """For the course's enrolled users (and administrators), and only where the
    caller's questions could read it: a topic of a module still locked for them is a
    403 naming what it waits for, as retrieval never reads it."""
    course = await state.catalog.resolve(course_key)
    await require_enrollment(state, user, course)
    topic = await read_topic(
        state.res.db, course_id=course.id, course_key=course.course_key, topic_key=topic_key
    )
    if topic is None:
        shown = topic_key if len(topic_key) <= 80 else f"{topic_key[:80]}…"
        raise NotFound(f"no topic {shown!r} in the course {course_key!r}")
    if not user.admin:
        # Cached in Redis (one GET); an open course's modules are all unlocked.
        async with translated():
            modules = await state.res.module_states().get(
                course.id, course.rules_version, user.user_id
            )
        locked = next(
            (m for m in modules.modules if m.number == topic.module_number and not m.unlocked),
            None,
        )
        if locked is not None:
            raise Forbidden(
                f"the topic {topic_key!r} is in module {locked.number}, which is locked "
                f"until you complete module(s) {', '.join(map(str, locked.waiting_for))}",
                details={"module": locked.number, "waiting_for": locked.waiting_for},
            )
    return topic


ROUTES = [courses, sessions, messages, topics, topic_text]
