"""Insight for a course's staff: what learners ask, where the course falls short, and
what they thought of the answers. Read from the activity record
(``rag/learners/activity.py``) and the feedback.

* **Questions**: the answered questions of a window, grouped by the semantic
  cache's clusters: a question served from a cache entry, the one whose answer
  made the entry, and those that followed it in single flight are one group; a
  question no entry holds (a follow-up, a flagged entry) groups with its exact
  repeats. Most asked first.
* **Gaps**: questions answered with weak or no evidence (nothing reached the
  relevance floor, or the best similarity was under ``below``, or the answer got
  a thumbs-down), grouped by the nearest topic: what the content is missing.
* **Feedback** (:func:`feedback`): newest first, a range of its index.

The two aggregates are not computed per page: aggregating a month of events costs
a quarter of a second at a million events (``bench/insights.py``). A worker
refreshes them every ``INSIGHTS_REFRESH_INTERVAL`` for the courses with new
events (:func:`refresh_summaries`, one transaction per course), for windows of
1, 7 and 30 days, into ``insight_summaries`` in page order; a page is one index
range of it. The cursor carries the refresh it started on, and a page asked
after another refresh is a 422 that says to start again, so a client paging
through sees every item exactly once.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from rag.learners.history import decode_cursor, page_of
from rag.platform.db import Database
from rag.platform.errors import InvalidInput

#: An answer whose best similarity is under RELEVANCE_FLOOR + this is a weak one (gaps).
WEAK_MARGIN = 0.1
#: The windows the aggregates are kept for, in days.
WINDOWS = (1, 7, 30)
Window = Literal[1, 7, 30]
Kind = Literal["questions", "gaps"]
_Count = Annotated[int, msgspec.Meta(ge=-(2**62), le=2**62)]
_Text = Annotated[str, msgspec.Meta(max_length=300)]
_Moment = Annotated[datetime, msgspec.Meta(tz=True)]


class QuestionGroup(msgspec.Struct, frozen=True):
    #: The group's key: ``entry:<cache entry id>`` or ``question:<hash>``.
    cluster: str
    asked: int
    #: Up to 3 of its questions as retrieval read them, newest first.
    examples: list[str]
    served_from_cache: int
    last_asked_at: datetime


class Gap(msgspec.Struct, frozen=True):
    #: The nearest topic of the weak answers ("" when nothing was retrieved).
    topic_key: str
    topic_title: str | None
    questions: int
    not_covered: int
    thumbs_down: int
    #: Up to 5 of its questions, newest first.
    examples: list[str]


_ANSWERED = """
WITH answered AS (
    SELECT e.payload, e.created_at
      FROM learner_activity_events e
     WHERE e.course_id = %(course_id)s AND e.event_type = 'answered'
       AND e.created_at >= now() - make_interval(days => %(window)s)
)"""

#: One window's question groups of a course, as summary rows.
QUESTIONS_SQL = (
    _ANSWERED  # noqa: S608 - constant pieces
    + """,
keyed AS (
    SELECT coalesce('entry:' || coalesce((a.payload ->> 'cache_entry')::bigint, s.id),
                    'question:' || md5(lower(coalesce(a.payload ->> 'question', ''))))
               AS cluster,
           coalesce(a.payload ->> 'question', '') AS question,
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
SELECT -asked AS neg_count, cluster AS key,
       jsonb_build_object('cluster', cluster, 'asked', asked, 'examples', examples,
                          'served_from_cache', served_from_cache,
                          'last_asked_at', last_asked_at) AS item
  FROM grouped
"""
)

#: One window's gaps of a course, as summary rows.
GAPS_SQL = (
    _ANSWERED  # noqa: S608 - constant pieces
    + """,
weak AS (
    SELECT coalesce(a.payload ->> 'topic_key', '') AS topic_key,
           coalesce(a.payload ->> 'question', '') AS question, a.created_at,
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
SELECT -g.questions AS neg_count, g.topic_key AS key,
       jsonb_build_object('topic_key', g.topic_key, 'topic_title', t.title,
                          'questions', g.questions, 'not_covered', g.not_covered,
                          'thumbs_down', g.thumbs_down, 'examples', g.examples) AS item
  FROM grouped g
  LEFT JOIN topics t ON t.course_id = %(course_id)s AND t.topic_key = g.topic_key
"""
)

_STORE_SQL = """
INSERT INTO insight_summaries (course_id, kind, window_days, neg_count, key, item)
SELECT %(course_id)s, %(kind)s, %(window)s, neg_count, key, item FROM ({query}) AS rows
"""


async def refresh_summaries(db: Database, course_id: int, *, below: float) -> datetime:
    """Recompute a course's question and gap summaries for every window, in one
    transaction (a page reads either the old summaries or the new ones, never a mix).
    ``below`` is the similarity under which an answer counts as weak. When it ran."""
    async with db.transaction() as conn:
        # The watermark first: events committed after it are the next refresh's.
        cur = await conn.execute("SELECT coalesce(max(id), 0), now() FROM learner_activity_events")
        row = await cur.fetchone()
        assert row is not None
        watermark, now = int(row[0]), row[1]
        await conn.execute("DELETE FROM insight_summaries WHERE course_id = %s", (course_id,))
        for window in WINDOWS:
            for kind, query in (("questions", QUESTIONS_SQL), ("gaps", GAPS_SQL)):
                await conn.execute(
                    _STORE_SQL.format(query=query),
                    {"course_id": course_id, "kind": kind, "window": window, "below": below},
                )
        await conn.execute(
            "INSERT INTO insight_refreshes (course_id, refreshed_at, events_until)"
            " VALUES (%s, %s, %s) ON CONFLICT (course_id) DO UPDATE"
            " SET refreshed_at = excluded.refreshed_at, events_until = excluded.events_until",
            (course_id, now, watermark),
        )
    stamp: datetime = now
    return stamp


#: Courses whose summaries are out of date: events since their last refresh, or a
#: refresh older than a day (the windows move on even when nothing happens).
STALE_SQL = """
SELECT c.id FROM courses c
  LEFT JOIN insight_refreshes r ON r.course_id = c.id
 WHERE (r.course_id IS NULL AND EXISTS (SELECT 1 FROM learner_activity_events e
                                         WHERE e.course_id = c.id))
    OR r.refreshed_at < now() - interval '1 day'
    OR EXISTS (SELECT 1 FROM learner_activity_events e
                WHERE e.id > r.events_until AND e.course_id = c.id)
 ORDER BY c.id
"""


class _CourseId(msgspec.Struct, frozen=True):
    id: int


async def refresh_stale(db: Database, *, below: float) -> list[int]:
    """Refresh every course whose summaries are out of date; their ids."""
    stale = [row.id for row in await db.fetch_all(_CourseId, STALE_SQL)]
    for course_id in stale:
        await refresh_summaries(db, course_id, below=below)
    return stale


class _SummaryKey(msgspec.Struct, frozen=True, array_like=True, tag="is"):
    kind: Kind
    window: Window
    refreshed_at: _Moment
    neg_count: _Count
    key: _Text


class _SummaryRow(msgspec.Struct, frozen=True):
    refreshed_at: datetime
    neg_count: int | None
    key: str | None
    item: dict[str, Any] | None


# One statement: the refresh the page reads and its rows, an index range of the
# summaries' primary key. No refresh yet: no row at all.
_PAGE_SELECT = """
SELECT r.refreshed_at, s.neg_count, s.key, s.item
  FROM insight_refreshes r
  LEFT JOIN LATERAL (
        SELECT neg_count, key, item FROM insight_summaries
         WHERE course_id = r.course_id AND kind = %(kind)s AND window_days = %(window)s
           {after}
         ORDER BY neg_count, key
         LIMIT %(limit)s) s ON true
 WHERE r.course_id = %(course_id)s
"""
PAGE_SQL = _PAGE_SELECT.format(after="")
PAGE_AFTER_SQL = _PAGE_SELECT.format(after="AND (neg_count, key) > (%(neg_count)s, %(key)s)")


class SummaryPage(msgspec.Struct, frozen=True):
    items: list[dict[str, Any]]
    next_cursor: str | None
    #: When the summaries were computed (null: not yet; the worker does it within
    #: INSIGHTS_REFRESH_INTERVAL of the first activity).
    refreshed_at: datetime | None


async def summary_page(
    db: Database,
    course_id: int,
    kind: Kind,
    *,
    window: Window,
    limit: int,
    cursor: str | None = None,
) -> SummaryPage:
    after = decode_cursor(cursor, _SummaryKey) if cursor else None
    if after is not None and (after.kind, after.window) != (kind, window):
        raise InvalidInput("cursor is not valid", details={"cursor": (cursor or "")[:200]})
    params: dict[str, Any] = {
        "course_id": course_id,
        "kind": kind,
        "window": after.window if after else window,
        "limit": limit + 1,
    }
    query = PAGE_SQL
    if after is not None:
        params |= {"neg_count": after.neg_count, "key": after.key}
        query = PAGE_AFTER_SQL
    rows = await db.fetch_all(_SummaryRow, query, params)
    if not rows:
        return SummaryPage([], None, None)
    refreshed = rows[0].refreshed_at
    if after is not None and refreshed != after.refreshed_at:
        raise InvalidInput(
            "the insights were refreshed since the first page: start again from the first page",
            details={"refreshed_at": refreshed.isoformat()},
        )
    found = [r for r in rows if r.item is not None]
    page, next_cursor = page_of(
        found,
        limit,
        lambda r: _SummaryKey(kind, window, refreshed, r.neg_count or 0, r.key or ""),
    )
    return SummaryPage([r.item for r in page if r.item is not None], next_cursor, refreshed)


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
