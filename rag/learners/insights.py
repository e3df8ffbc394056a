"""Insight for a course's staff: what learners ask, where the course falls short, and
what they thought of the answers. Read from the activity record
(``rag/learners/activity.py``) and the feedback, one statement per page whatever its size.

* **Questions** (:func:`asked_questions`): the answered questions of a period,
  grouped by the semantic cache's clusters: a question served from a cache
  entry, the one whose answer made the entry, and those that followed it in
  single flight are one group; a question no entry holds (a follow-up, a
  flagged entry) groups with its exact repeats. Most asked first.
* **Gaps** (:func:`gaps`): questions answered with weak or no evidence (nothing
  reached the relevance floor, or the best similarity was under ``below``, or
  the answer got a thumbs-down), grouped by the nearest topic: what the
  content is missing. Most frequent first.
* **Feedback** (:func:`feedback`): newest first.

Aggregate pages are keyset-paginated on (count, key) within a fixed period: the
first page fixes ``until`` (now, unless given) and the cursor carries it, so
events arriving while a client pages do not move items between pages.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec

from rag.learners.history import decode_cursor, page_of
from rag.platform.db import Database
from rag.platform.errors import InvalidInput

#: The default period of the aggregate insights.
DEFAULT_DAYS = 30
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_Text = Annotated[str, msgspec.Meta(max_length=300)]
_Moment = Annotated[datetime, msgspec.Meta(tz=True)]


class Period(msgspec.Struct, frozen=True):
    since: datetime
    until: datetime


def period(since: datetime | None, until: datetime | None) -> Period:
    """[since, until): ``until`` defaults to now, ``since`` to ``DEFAULT_DAYS`` before."""
    end = until or datetime.now(UTC)
    start = since or end - timedelta(days=DEFAULT_DAYS)
    if start.tzinfo is None or end.tzinfo is None:
        raise InvalidInput("since and until need a time zone (e.g. 2026-12-01T00:00:00Z)")
    if start >= end:
        raise InvalidInput("since must be before until")
    return Period(start, end)


# --- questions ------------------------------------------------------------------------


class QuestionGroup(msgspec.Struct, frozen=True):
    #: The group's key: ``entry:<cache entry id>`` or ``question:<hash>``.
    cluster: str
    asked: int
    #: Up to 3 of its questions as retrieval read them, newest first.
    examples: list[str]
    served_from_cache: int
    last_asked_at: datetime


class _QuestionsKey(msgspec.Struct, frozen=True, array_like=True, tag="iq"):
    since: _Moment
    until: _Moment
    asked: _Count
    cluster: _Text


_ANSWERED = """
WITH answered AS (
    SELECT e.payload, e.created_at
      FROM learner_activity_events e
     WHERE e.course_id = %(course_id)s AND e.event_type = 'answered'
       AND e.created_at >= %(since)s AND e.created_at < %(until)s
)"""

QUESTIONS_SQL = (
    _ANSWERED  # noqa: S608 - constant pieces
    + """,
keyed AS (
    SELECT coalesce('entry:' || coalesce((a.payload ->> 'cache_entry')::bigint, s.id),
                    'question:' || md5(lower(a.payload ->> 'question'))) AS cluster,
           a.payload ->> 'question' AS question,
           a.payload ->> 'served_by' AS served_by, a.created_at
      FROM answered a
      LEFT JOIN semantic_cache s
        ON s.job_id = coalesce((a.payload ->> 'source_job')::uuid, (a.payload ->> 'job_id')::uuid)
),
grouped AS (
    SELECT cluster, count(*) AS asked,
           (array_agg(question ORDER BY created_at DESC))[1:3] AS examples,
           count(*) FILTER (WHERE served_by = 'semantic_cache') AS served_from_cache,
           max(created_at) AS last_asked_at
      FROM keyed GROUP BY cluster
)
SELECT cluster, asked, examples, served_from_cache, last_asked_at FROM grouped
 WHERE %(after_asked)s::bigint IS NULL
    OR asked < %(after_asked)s OR (asked = %(after_asked)s AND cluster > %(after_cluster)s)
 ORDER BY asked DESC, cluster
 LIMIT %(limit)s
"""
)


async def asked_questions(
    db: Database,
    course_id: int,
    *,
    limit: int,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
) -> tuple[list[QuestionGroup], str | None]:
    after = decode_cursor(cursor, _QuestionsKey) if cursor else None
    span = Period(after.since, after.until) if after else period(since, until)
    rows = await db.fetch_all(
        QuestionGroup,
        QUESTIONS_SQL,
        {
            "course_id": course_id,
            "since": span.since,
            "until": span.until,
            "after_asked": after.asked if after else None,
            "after_cluster": after.cluster if after else "",
            "limit": limit + 1,
        },
    )
    return page_of(rows, limit, lambda g: _QuestionsKey(span.since, span.until, g.asked, g.cluster))


# --- gaps -----------------------------------------------------------------------------


class Gap(msgspec.Struct, frozen=True):
    #: The nearest topic of the weak answers ("" when nothing was retrieved).
    topic_key: str
    topic_title: str | None
    questions: int
    not_covered: int
    thumbs_down: int
    #: Up to 5 of its questions, newest first.
    examples: list[str]


class _GapsKey(msgspec.Struct, frozen=True, array_like=True, tag="ig"):
    since: _Moment
    until: _Moment
    below: Annotated[float, msgspec.Meta(ge=0, le=1)]
    questions: _Count
    topic_key: _Text


GAPS_SQL = (
    _ANSWERED  # noqa: S608 - constant pieces
    + """,
weak AS (
    SELECT coalesce(a.payload ->> 'topic_key', '') AS topic_key,
           a.payload ->> 'question' AS question, a.created_at,
           coalesce((a.payload ->> 'not_covered')::boolean, false) AS not_covered,
           f.job_id IS NOT NULL AS thumbs_down,
           (a.payload ->> 'best_similarity')::float8 AS similarity
      FROM answered a
      LEFT JOIN job_feedback f
        ON f.job_id = (a.payload ->> 'job_id')::uuid AND f.rating = 'down'
),
grouped AS (
    SELECT topic_key, count(*) AS questions,
           count(*) FILTER (WHERE not_covered) AS not_covered,
           count(*) FILTER (WHERE thumbs_down) AS thumbs_down,
           (array_agg(question ORDER BY created_at DESC))[1:5] AS examples
      FROM weak
     WHERE not_covered OR thumbs_down OR similarity < %(below)s
     GROUP BY topic_key
)
SELECT g.topic_key, t.title AS topic_title, g.questions, g.not_covered, g.thumbs_down,
       g.examples
  FROM grouped g
  LEFT JOIN topics t ON t.course_id = %(course_id)s AND t.topic_key = g.topic_key
 WHERE %(after_count)s::bigint IS NULL
    OR g.questions < %(after_count)s
    OR (g.questions = %(after_count)s AND g.topic_key > %(after_topic)s)
 ORDER BY g.questions DESC, g.topic_key
 LIMIT %(limit)s
"""
)


async def gaps(
    db: Database,
    course_id: int,
    *,
    limit: int,
    below: float,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
) -> tuple[list[Gap], str | None]:
    after = decode_cursor(cursor, _GapsKey) if cursor else None
    span = Period(after.since, after.until) if after else period(since, until)
    threshold = after.below if after else below
    rows = await db.fetch_all(
        Gap,
        GAPS_SQL,
        {
            "course_id": course_id,
            "since": span.since,
            "until": span.until,
            "below": threshold,
            "after_count": after.questions if after else None,
            "after_topic": after.topic_key if after else "",
            "limit": limit + 1,
        },
    )
    return page_of(
        rows,
        limit,
        lambda g: _GapsKey(span.since, span.until, threshold, g.questions, g.topic_key),
    )


# --- feedback -------------------------------------------------------------------------


class FeedbackItem(msgspec.Struct, frozen=True):
    job_id: uuid.UUID
    user_id: str
    rating: str
    comment: str
    updated_at: datetime
    question: str
    #: The start of the answer (300 characters).
    answer: str
    served_by: str | None


class _FeedbackKey(msgspec.Struct, frozen=True, array_like=True, tag="if"):
    updated_at: _Moment
    job_id: uuid.UUID


# Two statements, as in rag/learners/history.py: each a plain range scan of
# job_feedback_course_idx, whatever plan PostgreSQL caches.
_FEEDBACK_SELECT = """
SELECT f.job_id, f.user_id, f.rating, f.comment, f.updated_at, j.question,
       left(coalesce(j.answer, ''), 300) AS answer, j.served_by
  FROM job_feedback f
  JOIN assistant_jobs j ON j.id = f.job_id
 WHERE f.course_id = %(course_id)s
   AND (%(rating)s::text IS NULL OR f.rating = %(rating)s)
"""
_FEEDBACK_ORDER = """
 ORDER BY f.updated_at DESC, f.job_id DESC
 LIMIT %(limit)s
"""
FEEDBACK_SQL = _FEEDBACK_SELECT + _FEEDBACK_ORDER
FEEDBACK_AFTER_SQL = (
    _FEEDBACK_SELECT
    + "   AND (f.updated_at, f.job_id) < (%(after_at)s, %(after_job)s::uuid)"
    + _FEEDBACK_ORDER
)


async def feedback(
    db: Database,
    course_id: int,
    *,
    limit: int,
    rating: str | None = None,
    cursor: str | None = None,
) -> tuple[list[FeedbackItem], str | None]:
    after = decode_cursor(cursor, _FeedbackKey) if cursor else None
    params: dict[str, Any] = {
        "course_id": course_id,
        "rating": rating,
        "after_at": after.updated_at if after else None,
        "after_job": after.job_id if after else None,
        "limit": limit + 1,
    }
    query = FEEDBACK_SQL if after is None else FEEDBACK_AFTER_SQL
    rows = await db.fetch_all(FeedbackItem, query, params)
    return page_of(rows, limit, lambda f: _FeedbackKey(f.updated_at, f.job_id))


async def is_staff(db: Database, course_id: int, user_id: str) -> bool:
    """Whether the user teaches the course (an ``instructor`` enrollment)."""
    return bool(
        await db.fetch_value(
            "SELECT EXISTS (SELECT 1 FROM enrollments WHERE user_id = %s AND course_id = %s"
            " AND role = 'instructor')",
            (user_id, course_id),
        )
    )
