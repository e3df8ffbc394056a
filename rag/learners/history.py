"""Chat history and topic lists, keyset-paginated.

Every list is ordered by a unique key (a timestamp alone is not: ties are
broken by id), and a page continues strictly after the last key of the page
before, so rows are never skipped or repeated however many share a timestamp.
The cursor is that key, JSON-encoded and base64url'd: opaque to clients,
checked strictly here, and never trusted beyond being a position (every query
is still scoped to the caller). Each page is one statement that fetches one row
more than asked, to know whether there is a next page.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from rag.platform.db import Database, fetch_all, fetch_value
from rag.platform.errors import InvalidInput, NotFound

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

R = TypeVar("R", bound=msgspec.Struct)
K = TypeVar("K", bound=msgspec.Struct)


class SessionSummary(msgspec.Struct, frozen=True):
    id: uuid.UUID
    title: str
    message_count: int
    created_at: datetime
    updated_at: datetime


class Message(msgspec.Struct, frozen=True):
    id: int
    job_id: uuid.UUID
    role: Literal["user", "assistant"]
    content: str
    citations: Any
    cached: bool
    created_at: datetime


class Topic(msgspec.Struct, frozen=True):
    id: int
    topic_key: str
    module_number: int
    module_title: str | None
    position: int
    title: str


# Cursor payloads, encoded as arrays (``["s", updated_at, id]``). The tag makes
# a cursor of one list invalid for another; the bounds keep a tampered number
# from reaching PostgreSQL as an out-of-range parameter (a 500, not a 422).
_Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Int4 = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class SessionKey(msgspec.Struct, frozen=True, array_like=True, tag="s"):
    updated_at: Annotated[datetime, msgspec.Meta(tz=True)]
    id: uuid.UUID


class MessageKey(msgspec.Struct, frozen=True, array_like=True, tag="m"):
    id: _Id


class TopicKey(msgspec.Struct, frozen=True, array_like=True, tag="t"):
    module_number: _Int4
    position: _Int4


_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]{1,200}")


def check_limit(limit: int) -> int:
    """The page size, or 422: a larger value is refused rather than clamped, so a
    client never mistakes a short page for the end of the list."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(
            f"limit must be between 1 and {MAX_LIMIT}, not {limit}",
            details={"min": 1, "max": MAX_LIMIT},
        )
    return limit


def encode_cursor(key: msgspec.Struct) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).rstrip(b"=").decode()


def decode_cursor(text: str, key_type: type[K]) -> K:
    """The keyset position in ``text``; 422 for anything but a well-formed position
    (a forged one is harmless: it only moves where the caller's own list starts)."""
    if _CURSOR_TEXT.fullmatch(text):
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            return msgspec.json.decode(raw, type=key_type)
        except (ValueError, msgspec.DecodeError):  # binascii.Error is a ValueError
            pass
    raise InvalidInput("cursor is not valid", details={"cursor": text[:200]})


def page_of(
    rows: list[R], limit: int, key: Callable[[R], msgspec.Struct]
) -> tuple[list[R], str | None]:
    """The page of ``limit`` rows out of ``limit + 1`` fetched, and the next cursor
    (the last row's key) when the extra row shows there is more."""
    if len(rows) <= limit:
        return rows, None
    items = rows[:limit]
    return items, encode_cursor(key(items[-1]))


# Two statements per list rather than one with "cursor IS NULL OR ...": each is
# a plain range scan of its index, whatever plan PostgreSQL caches.
_SESSION_COLUMNS = "id, title, message_count, created_at, updated_at"
SESSIONS_SQL = f"""
SELECT {_SESSION_COLUMNS} FROM chat_sessions
 WHERE user_id = %(user_id)s AND course_id = %(course_id)s
 ORDER BY updated_at DESC, id DESC
 LIMIT %(limit)s
"""  # noqa: S608 - the interpolated text is a constant column list
SESSIONS_AFTER_SQL = f"""
SELECT {_SESSION_COLUMNS} FROM chat_sessions
 WHERE user_id = %(user_id)s AND course_id = %(course_id)s
   AND (updated_at, id) < (%(updated_at)s::timestamptz, %(id)s::uuid)
 ORDER BY updated_at DESC, id DESC
 LIMIT %(limit)s
"""  # noqa: S608

SESSION_OWNED_SQL = (
    "SELECT true FROM chat_sessions WHERE id = %(session_id)s AND user_id = %(user_id)s"
)

_MESSAGE_COLUMNS = "id, job_id, role, content, citations, cached, created_at"
MESSAGES_SQL = f"""
SELECT {_MESSAGE_COLUMNS} FROM chat_messages
 WHERE session_id = %(session_id)s
 ORDER BY id DESC
 LIMIT %(limit)s
"""  # noqa: S608
MESSAGES_AFTER_SQL = f"""
SELECT {_MESSAGE_COLUMNS} FROM chat_messages
 WHERE session_id = %(session_id)s AND id < %(id)s
 ORDER BY id DESC
 LIMIT %(limit)s
"""  # noqa: S608

# The module title comes from the course row in the same statement: one query
# per page whatever its size.
_TOPIC_SELECT = """
SELECT t.id, t.topic_key, t.module_number, c.modules ->> t.module_number::text AS module_title,
       t.position, t.title
  FROM topics t JOIN courses c ON c.id = t.course_id
 WHERE t.course_id = %(course_id)s
"""
TOPICS_SQL = f"""{_TOPIC_SELECT}
 ORDER BY t.module_number, t.position
 LIMIT %(limit)s
"""
TOPICS_AFTER_SQL = f"""{_TOPIC_SELECT}
   AND (t.module_number, t.position) > (%(module_number)s::int, %(position)s::int)
 ORDER BY t.module_number, t.position
 LIMIT %(limit)s
"""


async def list_sessions(
    db: Database, *, user_id: str, course_id: int, limit: int, cursor: str | None = None
) -> tuple[list[SessionSummary], str | None]:
    """The user's sessions in the course, most recently active first."""
    params: dict[str, Any] = {"user_id": user_id, "course_id": course_id, "limit": limit + 1}
    query = SESSIONS_SQL
    if cursor is not None:
        after = decode_cursor(cursor, SessionKey)
        params |= {"updated_at": after.updated_at, "id": after.id}
        query = SESSIONS_AFTER_SQL
    rows = await db.fetch_all(SessionSummary, query, params)
    return page_of(rows, limit, lambda s: SessionKey(s.updated_at, s.id))


async def list_messages(
    db: Database, *, user_id: str, session_id: uuid.UUID, limit: int, cursor: str | None = None
) -> tuple[list[Message], str | None]:
    """The session's messages, newest first; :class:`NotFound` unless it is the user's."""
    params: dict[str, Any] = {"user_id": user_id, "session_id": session_id, "limit": limit + 1}
    query = MESSAGES_SQL
    if cursor is not None:
        params["id"] = decode_cursor(cursor, MessageKey).id
        query = MESSAGES_AFTER_SQL
    async with db.connection() as conn:
        # Another user's session answers exactly like a missing one.
        if not await fetch_value(conn, SESSION_OWNED_SQL, params):
            raise NotFound(f"no session {session_id}")
        rows = await fetch_all(conn, Message, query, params)
    return page_of(rows, limit, lambda m: MessageKey(m.id))


async def list_topics(
    db: Database, *, course_id: int, limit: int, cursor: str | None = None
) -> tuple[list[Topic], str | None]:
    """The course's topics in module, then position order, with their module titles."""
    params: dict[str, Any] = {"course_id": course_id, "limit": limit + 1}
    query = TOPICS_SQL
    if cursor is not None:
        position = decode_cursor(cursor, TopicKey)
        params |= {"module_number": position.module_number, "position": position.position}
        query = TOPICS_AFTER_SQL
    rows = await db.fetch_all(Topic, query, params)
    return page_of(rows, limit, lambda t: TopicKey(t.module_number, t.position))


class CourseSummary(msgspec.Struct, frozen=True):
    course_key: str
    title: str
    description: str
    #: The caller's role in it: ``learner``, ``instructor`` or ``admin`` (an
    #: administrator's list holds every course).
    role: str


class CourseListKey(msgspec.Struct, frozen=True, array_like=True, tag="c"):
    course_key: Annotated[str, msgspec.Meta(max_length=64)]


_ENROLLED_SELECT = """
SELECT c.course_key, c.title, c.description, e.role
  FROM enrollments e JOIN courses c ON c.id = e.course_id
 WHERE e.user_id = %(user_id)s
"""
_ALL_SELECT = """
SELECT c.course_key, c.title, c.description, 'admin' AS role
  FROM courses c
 WHERE true
"""
# DEV_AUTO_ENROLL: any user may ask in any course (the first question enrolls them),
# so every course is theirs to pick; the role is their enrollment's, else learner.
_OPEN_SELECT = """
SELECT c.course_key, c.title, c.description, coalesce(e.role, 'learner') AS role
  FROM courses c
  LEFT JOIN enrollments e ON e.course_id = c.id AND e.user_id = %(user_id)s
 WHERE true
"""
_COURSE_ORDER = """
 ORDER BY c.course_key
 LIMIT %(limit)s
"""
_AFTER_KEY = "   AND c.course_key > %(after)s"


async def list_courses(
    db: Database,
    *,
    user_id: str,
    admin: bool,
    limit: int,
    cursor: str | None = None,
    auto_enroll: bool = False,
) -> tuple[list[CourseSummary], str | None]:
    """The caller's enrolled courses by key (every course for an administrator, and
    for anyone under ``DEV_AUTO_ENROLL``, where asking enrolls)."""
    select = _ALL_SELECT if admin else _OPEN_SELECT if auto_enroll else _ENROLLED_SELECT
    params: dict[str, Any] = {"user_id": user_id, "limit": limit + 1}
    query = select + _COURSE_ORDER
    if cursor is not None:
        params["after"] = decode_cursor(cursor, CourseListKey).course_key
        query = select + _AFTER_KEY + _COURSE_ORDER
    rows = await db.fetch_all(CourseSummary, query, params)
    return page_of(rows, limit, lambda c: CourseListKey(c.course_key))
