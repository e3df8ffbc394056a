"""Feedback on answers: thumbs up or down, with an optional comment, by the job's owner.

One per job: a second replaces the first. A thumbs-down on an answer that is in
the semantic cache (served from an entry, or the answer an entry was made from)
takes that entry out of service at once and flags it for an instructor's review
(``rag.answering.semantic_cache.flag``): no other learner is served it again. The feedback,
the flag and the activity event are one transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec

from rag.answering import semantic_cache
from rag.learners import activity
from rag.learners.activity import Event
from rag.platform.db import Database, fetch_one
from rag.platform.errors import InvalidInput, NotFound

Rating = Literal["up", "down"]
#: Longest comment kept, in characters.
MAX_COMMENT_CHARS = 2000


class Feedback(msgspec.Struct, frozen=True):
    job_id: uuid.UUID
    rating: Rating
    comment: str
    created_at: datetime
    updated_at: datetime
    #: Semantic-cache entries this feedback took out of service (a thumbs-down).
    flagged: int = 0


class _JobRow(msgspec.Struct, frozen=True):
    course_id: int
    status: str
    served_by: str | None
    served_from: Any


_UPSERT_SQL = """
INSERT INTO job_feedback (job_id, user_id, course_id, rating, comment)
VALUES (%(job_id)s, %(user_id)s, %(course_id)s, %(rating)s, %(comment)s)
ON CONFLICT (job_id) DO UPDATE
   SET rating = excluded.rating, comment = excluded.comment, updated_at = now()
RETURNING job_id, rating, comment, created_at, updated_at
"""


async def give_feedback(
    db: Database, job_id: uuid.UUID, user_id: str, rating: Rating, comment: str = ""
) -> Feedback:
    """Record the owner's feedback on an answered job; :class:`NotFound` for a job that
    is not theirs (like a missing one), :class:`InvalidInput` for one not answered."""
    comment = comment.strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidInput(f"the comment is {len(comment)} characters; at most {MAX_COMMENT_CHARS}")
    async with db.transaction() as conn:
        job = await fetch_one(
            conn,
            _JobRow,
            "SELECT course_id, status, served_by, served_from FROM assistant_jobs"
            " WHERE id = %s AND user_id = %s FOR UPDATE",
            (job_id, user_id),
        )
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.status != "succeeded":
            raise InvalidInput(
                f"the job is {job.status}: only an answered question can get feedback"
            )
        saved = await fetch_one(
            conn,
            Feedback,
            _UPSERT_SQL,
            {
                "job_id": job_id,
                "user_id": user_id,
                "course_id": job.course_id,
                "rating": rating,
                "comment": comment,
            },
        )
        assert saved is not None
        flagged = 0
        if rating == "down":
            source = job.served_from if job.served_by == "semantic_cache" else None
            entry = source.get("cached_question_id") if isinstance(source, dict) else None
            flagged = await semantic_cache.flag(conn, job.course_id, job_id, entry)
        await activity.record(
            conn,
            [
                Event(
                    user_id,
                    job.course_id,
                    "feedback",
                    {"job_id": str(job_id), "rating": rating, "flagged": flagged},
                )
            ],
        )
    return msgspec.structs.replace(saved, flagged=flagged)
