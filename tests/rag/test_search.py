from __future__ import annotations

import numpy as np
import pytest

from rag.answering.search import (
    HYBRID_SQL,
    RRF_SQL,
    SEARCH_SQL,
    Fusion,
    configure_search,
    search_chunks,
)
from rag.content.indexing import ensure_search_index, refresh_lexeme_statistics
from rag.platform.db import Database, fetch_value
from tests.fixtures.services import make_settings

DIMS = 1536


async def _index_definition(db: Database) -> str:
    return str(
        await db.fetch_value(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'course_chunks_embedding_hnsw'"
        )
    )


async def test_the_rebuilt_index_is_the_migrated_one(db: Database) -> None:
    migrated = await _index_definition(db)
    await db.execute("DROP INDEX course_chunks_embedding_hnsw")
    await ensure_search_index(db, make_settings())
    assert await _index_definition(db) == migrated
    assert "WITH (m='16', ef_construction='160')" in migrated


async def _seed(db: Database, courses: int, per_course: int, seed: int = 3) -> dict[str, int]:
    """Courses with one topic each and ``per_course`` random unit-vector chunks."""
    rng = np.random.default_rng(seed)
    ids: dict[str, int] = {}
    # Load without the index and build it once, as a bulk reindex does (much faster).
    await db.execute("DROP INDEX course_chunks_embedding_hnsw")
    async with db.transaction() as conn:
        for n in range(courses):
            key = f"course-{n}"
            course_id = await fetch_value(
                conn,
                "INSERT INTO courses (course_key, title) VALUES (%s, %s) RETURNING id",
                (key, key),
            )
            topic_id = await fetch_value(
                conn,
                "INSERT INTO topics (course_id, topic_key, module_number, position, title, body,"
                " content_hash) VALUES (%s, 't', 1, 1, %s, 'body', 'h') RETURNING id",
                (course_id, f"Topic of {key}"),
            )
            vectors = rng.normal(size=(per_course, DIMS)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            async with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY course_chunks (course_id, topic_id, chunk_index, text, char_start,"
                    " char_end,"
                    " token_count, content_hash, embedding_model, embedding)"
                    " FROM STDIN (FORMAT BINARY)"
                ) as copy,
            ):
                copy.set_types(
                    [
                        "int8",
                        "int8",
                        "int4",
                        "text",
                        "int4",
                        "int4",
                        "int4",
                        "text",
                        "text",
                        "vector",
                    ]
                )
                for i, vector in enumerate(vectors):
                    await copy.write_row(
                        (course_id, topic_id, i, f"{key} chunk {i}", 0, 1, 1, f"h{i}", "m", vector)
                    )
            ids[key] = int(course_id)
    await ensure_search_index(db, make_settings())
    async with db.transaction() as conn:
        for course_id in ids.values():
            await refresh_lexeme_statistics(conn, course_id)
    await db.execute("ANALYZE course_chunks")
    await db.execute("ANALYZE topics")
    return ids


@pytest.mark.parametrize(("courses", "per_course"), [(4, 1000), (20, 100)])
async def test_the_retrieval_query_uses_the_hnsw_index(
    db: Database, courses: int, per_course: int
) -> None:
    # Small courses too: there the planner's cost model prefers reading the
    # course's rows through any btree and sorting them.
    ids = await _seed(db, courses=courses, per_course=per_course)
    query = np.zeros(DIMS, dtype=np.float32)
    query[0] = 1.0
    for course_id in list(ids.values())[:5]:
        async with db.transaction() as conn:
            await configure_search(conn, 40)
            cur = await conn.execute(
                b"EXPLAIN " + SEARCH_SQL.encode(),
                {"query": query, "course_id": course_id, "k": 10},
            )
            plan = "\n".join(r[0] for r in await cur.fetchall())
        assert "Index Scan using course_chunks_embedding_hnsw" in plan, plan
        assert "Seq Scan on course_chunks" not in plan, plan


async def test_search_returns_the_nearest_chunks_of_one_course_only(db: Database) -> None:
    ids = await _seed(db, courses=3, per_course=400)
    # The stored vector of a known chunk must come back first, at distance ~0.
    async with db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT id, embedding FROM course_chunks WHERE course_id = %s AND chunk_index = 7",
                (ids["course-1"],),
            )
        ).fetchone()
    assert row is not None
    chunk_id, vector = row
    results = await search_chunks(
        db, ids["course-1"], np.asarray(vector.to_numpy()), k=10, ef_search=80
    )
    assert len(results) == 10
    assert results[0].id == chunk_id and results[0].distance < 1e-5
    assert results[0].topic_title == "Topic of course-1"
    assert all(r.text.startswith("course-1 ") for r in results)
    assert [r.distance for r in results] == sorted(r.distance for r in results)
    # The same vector searched in another course never returns course-1's chunk.
    other = await search_chunks(
        db, ids["course-0"], np.asarray(vector.to_numpy()), k=10, ef_search=80
    )
    assert len(other) == 10 and all(r.text.startswith("course-0 ") for r in other)


@pytest.fixture(params=["convex", "rrf"])
def fusion(request: pytest.FixtureRequest) -> Fusion:
    """Each hybrid test runs with both fusion methods (``RETRIEVAL_FUSION``)."""
    return Fusion(method=request.param)


async def _plan(db: Database, sql: str, params: dict[str, object]) -> str:
    async with db.transaction() as conn:
        await configure_search(conn, 40)
        cur = await conn.execute(b"EXPLAIN " + sql.encode(), params)
        return "\n".join(r[0] for r in await cur.fetchall())


def _hybrid_params(course_id: int, query: np.ndarray, text: str, k: int = 10) -> dict[str, object]:
    fusion = Fusion()
    return {
        "query": query,
        "course_id": course_id,
        "k": k,
        "text": text,
        "candidates": fusion.candidates,
        "rrf_k": fusion.rrf_k,
        "dense_weight": fusion.dense_weight,
        "lexical_weight": fusion.lexical_weight,
        "alpha": fusion.alpha,
    }


@pytest.mark.parametrize("sql", [HYBRID_SQL, RRF_SQL], ids=["convex", "rrf"])
async def test_hybrid_retrieval_walks_both_indexes(db: Database, sql: str) -> None:
    ids = await _seed(db, courses=4, per_course=1000)
    query = np.zeros(DIMS, dtype=np.float32)
    query[0] = 1.0
    plan = await _plan(db, sql, _hybrid_params(ids["course-2"], query, "chunk 17"))
    assert "Index Scan using course_chunks_embedding_hnsw" in plan, plan
    assert "Bitmap Index Scan on course_chunks_lexemes_idx" in plan, plan
    assert "Seq Scan on course_chunks" not in plan, plan


def _at_cosine(query: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """A unit vector whose cosine similarity with the unit vector ``query`` is ``cosine``."""
    other = np.random.default_rng(seed).normal(size=DIMS).astype(np.float32)
    other -= other.dot(query) * query
    other /= np.linalg.norm(other)
    vector = cosine * query + np.sqrt(1 - cosine**2) * other
    unit: np.ndarray = (vector / np.linalg.norm(vector)).astype(np.float32)
    return unit


async def _plant(
    db: Database,
    course_id: int,
    text: str,
    heading: str = "",
    vector: np.ndarray | None = None,
) -> int:
    """One more chunk in the course, with ``vector`` or a random embedding; its id. The
    course's lexeme statistics are rebuilt, as a reindex would."""
    if vector is None:
        vector = np.random.default_rng(11).normal(size=DIMS).astype(np.float32)
        vector /= np.linalg.norm(vector)
    chunk_id = int(
        await db.fetch_value(
            "INSERT INTO course_chunks (course_id, topic_id, topic_title, chunk_index,"
            " heading_path, text, char_start, char_end, token_count, content_hash,"
            " embedding_model, embedding)"
            " SELECT %s, id, title, 999, %s, %s, 0, 1, 1, 'planted', 'm', %s FROM topics"
            " WHERE course_id = %s RETURNING id",
            (course_id, [heading] if heading else [], text, vector, course_id),
        )
    )
    async with db.transaction() as conn:
        await refresh_lexeme_statistics(conn, course_id)
    return chunk_id


async def test_hybrid_retrieval_finds_an_exact_term_dense_search_misses(
    db: Database, fusion: Fusion
) -> None:
    ids = await _seed(db, courses=2, per_course=300)
    course = ids["course-1"]
    planted = await _plant(
        db, course, "The router shows error E4021 when its WireGuard port 51820 is closed."
    )
    # The same words in the other course: the text side filters by course as well.
    await _plant(db, ids["course-0"], "error E4021 on port 51820")
    # A query vector unrelated to the planted chunk's: dense search cannot find it.
    query = np.random.default_rng(5).normal(size=DIMS).astype(np.float32)
    query /= np.linalg.norm(query)
    dense = await search_chunks(db, course, query, k=6, ef_search=80)
    assert planted not in [c.id for c in dense]
    question = "What does E4021 mean?"
    hybrid = await search_chunks(db, course, query, k=6, ef_search=80, text=question, fusion=fusion)
    assert planted in [c.id for c in hybrid]
    assert all(c.text.startswith("course-1 ") or c.id == planted for c in hybrid)
    # The port number alone finds it too, and the distance is still the chunk's cosine.
    by_port = await search_chunks(
        db, course, query, k=6, ef_search=80, text="port 51820", fusion=fusion
    )
    found = next(c for c in by_port if c.id == planted)
    assert abs(found.distance - (1 - found.similarity)) < 1e-9 and 0.5 < found.distance < 1.5
    # Dense ordering is kept for the rest: the nearest dense chunk is still retrieved.
    assert dense[0].id in [c.id for c in hybrid]


async def test_convex_fusion_puts_a_rare_exact_term_ahead_of_common_words(
    db: Database,
) -> None:
    """The ``100.64.0.0/10`` case of the retrieval benchmark: the one chunk holding the
    question's rare term is only a fair dense match, and five chunks that match its
    common words ("address", "range") are closer. Ranks alone (RRF) put a chunk both
    sides found at middling ranks first; the convex score weighs how much of the
    question's term weight each chunk holds, and the rare term wins."""
    ids = await _seed(db, courses=1, per_course=200)
    course = ids["course-0"]
    query = np.random.default_rng(21).normal(size=DIMS).astype(np.float32)
    query /= np.linalg.norm(query)
    near = [
        await _plant(
            db,
            course,
            f"Every address range on a home network, part {n}.",
            vector=_at_cosine(query, 0.4, seed=30 + n),
        )
        for n in range(5)
    ]
    exact = await _plant(
        db,
        course,
        "Carrier-grade NAT hands out addresses from 100.64.0.0/10.",
        vector=_at_cosine(query, 0.3, seed=40),
    )
    question = "What is the 100.64.0.0/10 address range for?"
    convex = await search_chunks(
        db, course, query, k=6, ef_search=80, text=question, fusion=Fusion()
    )
    assert convex[0].id == exact
    assert set(near) <= {c.id for c in convex}
    rrf = await search_chunks(
        db, course, query, k=6, ef_search=80, text=question, fusion=Fusion(method="rrf")
    )
    assert rrf[0].id in near and exact in {c.id for c in rrf}


async def test_hybrid_retrieval_ranks_title_and_heading_matches(
    db: Database, fusion: Fusion
) -> None:
    ids = await _seed(db, courses=1, per_course=200)
    course = ids["course-0"]
    # "Topic of course-0" is every chunk's title; a heading is the planted chunk's own.
    planted = await _plant(db, course, "Some text about nothing in particular.", "Bufferbloat")
    query = np.random.default_rng(9).normal(size=DIMS).astype(np.float32)
    query /= np.linalg.norm(query)
    hits = await search_chunks(
        db, course, query, k=3, ef_search=80, text="what is bufferbloat", fusion=fusion
    )
    assert planted in [c.id for c in hits]


async def test_a_question_of_stopwords_only_falls_back_to_dense_ranking(
    db: Database, fusion: Fusion
) -> None:
    ids = await _seed(db, courses=1, per_course=200)
    query = np.random.default_rng(3).normal(size=DIMS).astype(np.float32)
    query /= np.linalg.norm(query)
    dense = await search_chunks(db, ids["course-0"], query, k=5, ef_search=80)
    hybrid = await search_chunks(
        db, ids["course-0"], query, k=5, ef_search=80, text="what is it?", fusion=fusion
    )
    assert [c.id for c in hybrid] == [c.id for c in dense]
