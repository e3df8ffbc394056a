"""Retrieval: the best chunks of one course, in one query: HNSW alone (dense), or
HNSW and full-text search fused by reciprocal rank (hybrid, the default).

The query orders by cosine distance on ``course_chunks.embedding`` so that
PostgreSQL walks the HNSW index, and filters by course while it walks:
pgvector 0.8's iterative index scan (``hnsw.iterative_scan = relaxed_order``)
keeps scanning until ``k`` rows pass the filter, instead of returning fewer
than ``k`` when a course holds a small share of all chunks. The chunk rows and
their topic titles come back together (a join, not one query per chunk).

Hybrid (:data:`HYBRID_SQL`): dense embeddings miss exact terms a learner types
(an error code, a port number, "802.11r"), and a hashed or small model blurs
them; PostgreSQL full-text search over the chunk's title, headings and text
(``course_chunks.lexemes``, a GIN index) finds them. Each side ranks its own
``candidates`` chunks of the course, and a chunk's fused score is the sum over
the sides that found it of ``weight / (rrf_k + rank)`` (reciprocal rank fusion,
Cormack et al. 2009: ranks, not scores, so a cosine and a text score need no
common scale). The text side scores a chunk by the question's lexemes it holds,
each weighted by its rarity in the course (BM25's inverse document frequency,
from ``course_lexemes``, kept by each reindex): "Calvel" or "100.64.0.0/10" in
one chunk outweighs "flour" in most of them, which ``ts_rank_cd`` cannot do.
(Counting a title or heading match double measured worse offline and no
better with MiniLM: the title is in every chunk's embedded text already.) Any
one lexeme matches (a question's every word is rarely in one chunk). Still one
round trip: both sides, the fusion and the join are one statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np

from rag.platform.db import Conn, Database, fetch_all
from rag.providers.base import Vectors

SEARCH_SQL = """
SELECT id, topic_id, topic_key, topic_title, heading_path, text, distance, module_number
  FROM (
        SELECT c.id, c.topic_id, t.topic_key, t.title AS topic_title, c.heading_path, c.text,
               c.embedding <=> %(query)s AS distance, c.module_number
          FROM course_chunks c
          JOIN topics t ON t.id = c.topic_id
         WHERE c.course_id = %(course_id)s
         ORDER BY c.embedding <=> %(query)s
         LIMIT %(k)s
       ) AS nearest
 ORDER BY distance
"""


_HYBRID_SIDES = """
WITH terms AS (
    SELECT l.lexeme,
           ln(1 + (k.lexeme_chunks - l.chunks + 0.5) / (l.chunks + 0.5)) AS idf
      FROM courses k
      JOIN course_lexemes l ON l.course_id = k.id
     WHERE k.id = %(course_id)s
       AND l.lexeme = ANY (tsvector_to_array(to_tsvector('english', %(text)s)))
),
dense AS (
    SELECT id, row_number() OVER (ORDER BY distance) AS rank
      FROM (SELECT c.id, c.embedding <=> %(query)s AS distance
              FROM course_chunks c
             WHERE c.course_id = %(course_id)s
             ORDER BY c.embedding <=> %(query)s
             LIMIT %(candidates)s) AS nearest
),
lexical AS (
    SELECT id, score, row_number() OVER (ORDER BY score DESC, id) AS rank
      FROM (SELECT c.id,
                   sum(t.idf) AS score
              FROM terms t
              JOIN course_chunks c
                ON c.course_id = %(course_id)s AND c.lexemes @@ quote_literal(t.lexeme)::tsquery
             GROUP BY c.id
             ORDER BY score DESC, c.id
             LIMIT %(candidates)s) AS matched
)"""

_CHUNK_COLUMNS = """
SELECT c.id, c.topic_id, t.topic_key, t.title AS topic_title, c.heading_path, c.text,
       c.embedding <=> %(query)s AS distance, c.module_number"""

#: Convex combination (the default): a chunk's score is ``alpha`` times its cosine
#: similarity plus ``1 - alpha`` times the share of the question's lexeme weight it
#: holds (its IDF sum over the IDF sum of every question lexeme the course has, so in
#: [0, 1] with no per-query min-max), over the union of both sides' candidates.
# Both statements share their sides; the pieces are constants (no input is pasted in).
HYBRID_SQL = (
    _HYBRID_SIDES  # noqa: S608
    + """,
pool AS (SELECT id FROM dense UNION SELECT id FROM lexical)
"""
    + _CHUNK_COLUMNS
    + """
  FROM pool p
  JOIN course_chunks c ON c.id = p.id
  JOIN topics t ON t.id = c.topic_id
  LEFT JOIN lexical l ON l.id = p.id
 ORDER BY %(alpha)s::float8 * (1 - (c.embedding <=> %(query)s))
          + (1 - %(alpha)s::float8)
            * coalesce(l.score / nullif((SELECT sum(idf) FROM terms), 0), 0) DESC,
          c.id
 LIMIT %(k)s
"""
)

#: Reciprocal rank fusion (``RETRIEVAL_FUSION=rrf``): ranks only, ``weight / (rrf_k +
#: rank)`` summed over the sides that found the chunk.
RRF_SQL = (
    _HYBRID_SIDES  # noqa: S608
    + """,
fused AS (
    SELECT id, sum(weight / (%(rrf_k)s + rank)) AS score
      FROM (SELECT id, rank, %(dense_weight)s::float8 AS weight FROM dense
            UNION ALL
            SELECT id, rank, %(lexical_weight)s::float8 FROM lexical) AS ranked
     GROUP BY id
     ORDER BY score DESC, id
     LIMIT %(k)s
)
"""
    + _CHUNK_COLUMNS
    + """
  FROM fused f
  JOIN course_chunks c ON c.id = f.id
  JOIN topics t ON t.id = c.topic_id
 ORDER BY f.score DESC, c.id
"""
)


_COURSE_FILTER = "c.course_id = %(course_id)s"
_MODULE_FILTER = _COURSE_FILTER + " AND c.module_number = ANY(%(modules)s::int[])"


def gated(sql: str) -> str:
    """``sql`` reading only chunks of the modules in ``%(modules)s`` (module gating,
    ``rag/learners/progress.py``): the filter sits beside the course's, inside both sides, so
    the HNSW walk's iterative scan keeps going until enough chunks pass it."""
    assert _COURSE_FILTER in sql
    return sql.replace(_COURSE_FILTER, _MODULE_FILTER)


_GATED = {sql: gated(sql) for sql in (SEARCH_SQL, HYBRID_SQL, RRF_SQL)}


class Fusion(msgspec.Struct, frozen=True):
    """How hybrid retrieval fuses its two sides (``RETRIEVAL_*`` and ``RRF_*`` settings)."""

    #: ``convex`` (scores, :data:`HYBRID_SQL`) or ``rrf`` (ranks, :data:`RRF_SQL`).
    method: Literal["convex", "rrf"] = "convex"
    #: Chunks each side ranks before fusion.
    candidates: int = 20
    #: Convex: the cosine similarity's share of the score; the rest is lexical.
    alpha: float = 0.6
    #: The ``k`` of reciprocal rank fusion: larger flattens the head of each ranking.
    rrf_k: int = 60
    dense_weight: float = 1.0
    #: Below (rrf_k + 1) / (rrf_k + k), about 0.92, a chunk only full-text search finds
    #: can never reach the top k; 1.0 lets its best match in (docs/decisions.md).
    lexical_weight: float = 1.0


class RetrievedChunk(msgspec.Struct, frozen=True):
    id: int
    topic_id: int
    topic_key: str
    topic_title: str
    heading_path: list[str]
    text: str
    distance: float
    #: The chunk's module (gating, pedagogy modes); None for a row written outside indexing.
    module_number: int | None = None

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
    db: Database,
    course_id: int,
    query: Vectors | np.ndarray,
    *,
    k: int,
    ef_search: int,
    text: str | None = None,
    fusion: Fusion | None = None,
    modules: Sequence[int] | None = None,
) -> list[RetrievedChunk]:
    """The ``k`` best chunks of ``course_id`` for ``query`` (a unit vector), best first:
    by HNSW alone, or fused with full-text search on ``text`` when both ``text`` and
    ``fusion`` are given; only of ``modules`` when given (gating; None: every module).
    ``distance`` is always the chunk's cosine distance."""
    vector = np.asarray(query, dtype=np.float32).reshape(-1)
    async with db.transaction() as conn:
        await configure_search(conn, ef_search)
        return await _search(
            conn, course_id, vector, k=k, text=text, fusion=fusion, modules=modules
        )


async def _search(
    conn: Conn,
    course_id: int,
    vector: np.ndarray,
    *,
    k: int,
    text: str | None,
    fusion: Fusion | None,
    modules: Sequence[int] | None = None,
) -> list[RetrievedChunk]:
    params: dict[str, object] = {"query": vector, "course_id": course_id, "k": k}
    if modules is not None:
        params["modules"] = list(modules)

    def statement(sql: str) -> str:
        return sql if modules is None else _GATED[sql]

    if text is None or fusion is None:
        return await fetch_all(conn, RetrievedChunk, statement(SEARCH_SQL), params)
    params.update(text=text, candidates=max(fusion.candidates, k))
    if fusion.method == "rrf":
        params.update(
            rrf_k=fusion.rrf_k,
            dense_weight=fusion.dense_weight,
            lexical_weight=fusion.lexical_weight,
        )
        return await fetch_all(conn, RetrievedChunk, statement(RRF_SQL), params)
    params.update(alpha=fusion.alpha)
    return await fetch_all(conn, RetrievedChunk, statement(HYBRID_SQL), params)
