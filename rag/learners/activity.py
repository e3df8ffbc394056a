"""The activity record (``learner_activity_events``): what happened to every question,
for the instructors' insights (``rag/learners/insights.py``).

Each event is written by the step that makes it true, in the same transaction or
statement, so the record neither misses nor doubles an outcome (a job run twice
writes its outcome once: only the run whose transition succeeded writes):

* ``asked`` and ``answered`` when a job succeeds (``rag/answering/answers.py``, with the
  answer): the answered event says how (``served_by``), the question as
  retrieval read it, the nearest topic, the best cosine similarity and whether
  nothing in the course reached the relevance floor (``not_covered``);
* ``asked`` and ``failed`` or ``cancelled`` with those transitions
  (``rag/answering/jobs.py``);
* ``feedback`` with the feedback itself (``rag/learners/feedback.py``).

None of it is on the API's request path for a question: the worker writes it,
one multi-row insert per job beside writes it makes anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec

from rag.platform.db import Conn

EventType = Literal["asked", "answered", "failed", "cancelled", "feedback"]


class Event(msgspec.Struct, frozen=True):
    user_id: str
    course_id: int
    event_type: EventType
    payload: dict[str, Any]
    #: When it happened; None: now.
    at: datetime | None = None


_INSERT_SQL = """
INSERT INTO learner_activity_events (user_id, course_id, event_type, payload, created_at)
SELECT u, c, t, p::jsonb, coalesce(a, now())
  FROM unnest(%(users)s::text[], %(courses)s::bigint[], %(types)s::text[], %(payloads)s::text[],
              %(at)s::timestamptz[]) AS e(u, c, t, p, a)
"""


async def record(conn: Conn, events: Sequence[Event]) -> None:
    """Write ``events`` in one statement, in the caller's transaction."""
    if not events:
        return
    await conn.execute(
        _INSERT_SQL,
        {
            "users": [e.user_id for e in events],
            "courses": [e.course_id for e in events],
            "types": [e.event_type for e in events],
            "payloads": [msgspec.json.encode(e.payload).decode() for e in events],
            "at": [e.at for e in events],
        },
    )
