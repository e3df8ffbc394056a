"""Retrieval: the nearest chunks of one course, by HNSW, in one query.

The query orders by cosine distance on ``course_chunks.embedding`` so that
PostgreSQL walks the HNSW index, and filters by course while it walks:
pgvector 0.8's iterative index scan (``hnsw.iterative_scan = relaxed_order``)
keeps scanning until ``k`` rows pass the filter, instead of returning fewer
than ``k`` when a course holds a small share of all chunks. The chunk rows and
their topic titles come back together (a join, not one query per chunk).
"""

from __future__ import annotations

import msgspec
import numpy as np

from rag.db import Conn, Database, fetch_all
from rag.providers.base import Vectors

SEARCH_SQL = """
SELECT id, topic_id, topic_key, topic_title, heading_path, text, distance
  FROM (
        SELECT c.id, c.topic_id, t.topic_key, t.title AS topic_title, c.heading_path, c.text,
               c.embedding <=> %(query)s AS distance
          FROM course_chunks c
          JOIN topics t ON t.id = c.topic_id
         WHERE c.course_id = %(course_id)s
         ORDER BY c.embedding <=> %(query)s
         LIMIT %(k)s
       ) AS nearest
 ORDER BY distance
"""


class RetrievedChunk(msgspec.Struct, frozen=True):
    id: int
    topic_id: int
    topic_key: str
    topic_title: str
    heading_path: list[str]
    text: str
    distance: float

    @property
    def similarity(self) -> float:
        return 1.0 - self.distance


async def configure_search(conn: Conn, ef_search: int) -> None:
    """Per-transaction settings (``set_config(..., true)`` is ``SET LOCAL``: nothing
    leaks to the next user of the pooled connection, and it works behind PgBouncer).

    ``enable_seqscan = off`` follows pgvector's own advice for the planner's
    cost estimate, which favours "read the course's rows and sort" on small
    tables; ``enable_sort = off`` closes the same door through any btree (the
    retrieval benchmark caught the planner reading a course through the
    topic/hash index). That plan is exact but its cost grows with the course,
    while the HNSW walk stays flat, so retrieval always takes the index. The
    outer re-sort of the k rows still happens: the settings only price plans.
    """
    await conn.execute(
        "SELECT set_config('hnsw.ef_search', %s, true),"
        " set_config('hnsw.iterative_scan', 'relaxed_order', true),"
        " set_config('enable_seqscan', 'off', true),"
        " set_config('enable_sort', 'off', true)",
        (str(ef_search),),
    )


async def search_chunks(
    db: Database, course_id: int, query: Vectors | np.ndarray, *, k: int, ef_search: int
) -> list[RetrievedChunk]:
    """The ``k`` chunks of ``course_id`` nearest to ``query`` (a unit vector), best first."""
    vector = np.asarray(query, dtype=np.float32).reshape(-1)
    async with db.transaction() as conn:
        await configure_search(conn, ef_search)
        return await fetch_all(
            conn, RetrievedChunk, SEARCH_SQL, {"query": vector, "course_id": course_id, "k": k}
        )
