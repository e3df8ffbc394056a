"""Course import and incremental reindexing.

Import writes what a course source says (courses, topics) in one transaction.
Reindex turns topics into embedded chunks, doing as little as it can:

* a topic whose *signature* (content hash, chunking parameters, embedding
  model and size) equals the one recorded at its last indexing is skipped
  without being chunked or embedded again: an unchanged course costs a few
  queries and no provider call;
* in a changed topic, a chunk whose content hash is already stored for that
  topic (same model) is kept, so only new or edited chunks are embedded;
* embeddings go through the Redis cache in batches across topics;
* each topic's deletes and inserts are one transaction, so a crash leaves every
  topic either old or new, never mixed;
* the run ends with one transaction that records every written topic's
  signature and bumps the course's ``content_version`` once (the semantic
  cache is keyed by it). A run that dies midway records no signature, so the
  next run plans those topics again (keeping their chunks by hash: no
  embedding) and bumps the version then: nothing cached while the content was
  half new outlives the run that finishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import numpy as np

from rag.answering import semantic_cache
from rag.content.chunking import Chunk, chunk_topic
from rag.content.courses import CourseSource
from rag.content.embeddings import EmbeddingCache
from rag.platform.db import Conn, Database, fetch_all, fetch_value, stored_dimensions
from rag.platform.errors import NotFound
from rag.platform.redis import held_lock
from rag.platform.settings import Settings
from rag.providers.base import Vectors

log = logging.getLogger("rag.content.indexing")

#: Bump when chunking rules change so every topic is re-chunked once.
CHUNKER_VERSION = 1

#: The retrieval index, as in sql/migrations/0003 (a test keeps the two equal).
#: A bulk load drops it and builds it again with this statement. ef_construction
#: is 160, not pgvector's default 64: at 64 a few percent of clustered chunks end
#: up unreachable in the graph and no ef_search finds them (docs/decisions.md).
HNSW_INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS course_chunks_embedding_hnsw ON course_chunks "
    "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 160)"
)
#: Below this many new chunks, inserting into the live HNSW index (~300-400
#: rows/s at 1536 dimensions here) beats dropping and rebuilding it (~2,000
#: rows/s for the whole table, measured in docs/benchmarks.md).
BULK_MIN_CHUNKS = 2000
#: One reindex at a time, cluster-wide: two runs on one course would both insert
#: its new chunks, and a bulk load drops the index that others insert into.
REINDEX_LOCK = "lock:reindex"


@dataclass
class ImportReport:
    course_key: str
    course_id: int
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0


async def import_course(db: Database, source: CourseSource) -> ImportReport:
    """Upsert the course and its topics by key; delete topics the source no longer has."""
    async with db.transaction() as conn:
        course_id = await fetch_value(
            conn,
            """
            INSERT INTO courses (course_key, title, description, modules, unlock, mode,
                                 module_rules)
            VALUES (%(key)s, %(title)s, %(description)s, %(modules)s, %(unlock)s, %(mode)s,
                    %(rules)s)
            ON CONFLICT (course_key) DO UPDATE
               SET title = excluded.title, description = excluded.description,
                   modules = excluded.modules, unlock = excluded.unlock,
                   mode = excluded.mode, module_rules = excluded.module_rules,
                   updated_at = now()
            RETURNING id
            """,
            {
                "key": source.key,
                "title": source.title,
                "description": source.description,
                "modules": msgspec.json.encode(
                    {str(k): v for k, v in source.modules.items()}
                ).decode(),
                "unlock": source.unlock,
                "mode": source.mode,
                "rules": msgspec.json.encode(
                    {str(k): v for k, v in source.module_rules.items()}
                ).decode(),
            },
        )
        report = ImportReport(source.key, int(course_id))
        existing = {
            key: digest
            for key, digest in await (
                await conn.execute(
                    "SELECT topic_key, content_hash FROM topics WHERE course_id = %s",
                    (course_id,),
                )
            ).fetchall()
        }
        keep = {t.key for t in source.topics}
        gone = [key for key in existing if key not in keep]
        # Positions may be swapped between topics: check uniqueness at commit.
        await conn.execute("SET CONSTRAINTS topics_course_order_key DEFERRED")
        if gone:
            # Their chunks go with them (ON DELETE CASCADE): answers built on them
            # must not be served from the semantic cache any more.
            chunks = await fetch_value(
                conn,
                "SELECT coalesce(array_agg(c.id), '{}') FROM course_chunks c"
                " JOIN topics t ON t.id = c.topic_id"
                " WHERE t.course_id = %s AND t.topic_key = ANY(%s)",
                (course_id, gone),
            )
            await semantic_cache.evict(conn, int(course_id), list(chunks))
            await conn.execute(
                "DELETE FROM topics WHERE course_id = %s AND topic_key = ANY(%s)",
                (course_id, gone),
            )
            await conn.execute(
                "UPDATE courses SET content_version = content_version + 1 WHERE id = %s",
                (course_id,),
            )
        report.removed = len(gone)
        changed = [t for t in source.topics if existing.get(t.key) != t.content_hash]
        report.unchanged = len(source.topics) - len(changed)
        report.added = sum(1 for t in changed if t.key not in existing)
        report.updated = len(changed) - report.added
        if changed:
            async with conn.cursor() as cur:
                await cur.executemany(
                    """
                    INSERT INTO topics (course_id, topic_key, module_number, position,
                                        title, body, content_hash)
                    VALUES (%(course_id)s, %(key)s, %(module)s, %(position)s,
                            %(title)s, %(body)s, %(hash)s)
                    ON CONFLICT (course_id, topic_key) DO UPDATE
                       SET module_number = excluded.module_number,
                           position = excluded.position, title = excluded.title,
                           body = excluded.body, content_hash = excluded.content_hash,
                           updated_at = now()
                    """,
                    [
                        {
                            "course_id": course_id,
                            "key": t.key,
                            "module": t.module,
                            "position": t.position,
                            "title": t.title,
                            "body": t.body,
                            "hash": t.content_hash,
                        }
                        for t in changed
                    ],
                )
            # A topic moved to another module keeps its chunks until the reindex (their
            # text may not have changed): their module moves with it now, so gating
            # never reads a stale one.
            await conn.execute(
                "UPDATE course_chunks c SET module_number = t.module_number FROM topics t"
                " WHERE t.id = c.topic_id AND t.course_id = %s"
                " AND c.module_number IS DISTINCT FROM t.module_number",
                (course_id,),
            )
    return report


@dataclass
class ReindexReport:
    courses: list[str] = field(default_factory=list)
    topics: int = 0
    topics_changed: int = 0
    chunks_added: int = 0
    chunks_kept: int = 0
    chunks_deleted: int = 0
    provider_calls: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    #: Part of ``seconds`` spent rebuilding the HNSW index after a bulk load.
    index_build_seconds: float = 0.0
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_added / self.seconds if self.seconds > 0 else 0.0


class TopicRow(msgspec.Struct):
    id: int
    module_number: int
    title: str
    body: str
    content_hash: str
    indexed_signature: str | None


class StoredChunk(msgspec.Struct):
    id: int
    topic_id: int
    content_hash: str
    embedding_model: str


#: Called with (chunks done, chunks planned) as work progresses.
Progress = Callable[[int, int], None]


def topic_signature(settings: Settings, model_id: str, content_hash: str) -> str:
    raw = (
        f"{content_hash}|{settings.chunk_target_tokens}|{settings.chunk_overlap_tokens}|"
        f"{model_id}|{settings.embedding_dimensions}|{CHUNKER_VERSION}"
    )
    return hashlib.sha256(raw.encode()).hexdigest()


async def course_keys(db: Database) -> list[str]:
    async with db.connection() as conn:
        rows = await (
            await conn.execute("SELECT course_key FROM courses ORDER BY course_key")
        ).fetchall()
    return [r[0] for r in rows]


async def resize_embeddings(db: Database, dimensions: int) -> bool:
    """Change the stored vector size to ``dimensions``, dropping every vector.

    Only a full reindex of every course may call this: it empties the chunk
    table and the semantic cache (the HNSW indexes are rebuilt by the ALTER).
    Returns whether anything changed.
    """
    async with db.transaction() as conn:
        stored = await stored_dimensions(conn)
        if all(d == dimensions for d in stored.values()):
            return False
        log.warning("changing embedding size from %s to %d", stored, dimensions)
        await conn.execute("DELETE FROM semantic_cache")
        await conn.execute("DELETE FROM course_chunks")
        await conn.execute("UPDATE topics SET indexed_signature = NULL")
        await conn.execute("UPDATE courses SET content_version = content_version + 1")
        for table in ("course_chunks", "semantic_cache"):
            await conn.execute(
                f"ALTER TABLE {table} ALTER COLUMN embedding TYPE vector({int(dimensions)})"
            )
        return True


class _Plan(msgspec.Struct):
    topic: TopicRow
    signature: str
    chunks: list[Chunk]
    keep: dict[int, int]  # chunk index -> stored chunk id kept as is
    delete: list[int]  # stored chunk ids to delete
    new: list[int]  # chunk indexes to embed and insert


async def reindex_course(
    db: Database,
    cache: EmbeddingCache,
    settings: Settings,
    course_key: str,
    *,
    full: bool = False,
    progress: Progress | None = None,
    report: ReindexReport | None = None,
    lock_wait: float = 600,
) -> ReindexReport:
    """Bring one course's chunks in line with its topics; see the module docstring."""
    report = report or ReindexReport()
    async with held_lock(cache.redis, REINDEX_LOCK, wait=lock_wait):
        await _reindex_locked(db, cache, settings, course_key, full, progress, report)
    return report


async def _reindex_locked(
    db: Database,
    cache: EmbeddingCache,
    settings: Settings,
    course_key: str,
    full: bool,
    progress: Progress | None,
    report: ReindexReport,
) -> None:
    started = time.perf_counter()
    calls_before, hits_before = cache.stats.provider_calls, cache.stats.hits
    model_id = cache.provider.embedding_model
    course_id, topics, plans, stored_total, untouched = await _plan(
        db, settings, course_key, model_id, full
    )
    report.topics += topics
    report.chunks_kept += untouched
    planned = sum(len(p.new) for p in plans)
    # A large load into a large share of the table: build the index once at the
    # end instead of inserting row by row into the live graph.
    bulk = planned >= BULK_MIN_CHUNKS and planned * 2 >= stored_total + planned
    if bulk:
        log.info("bulk load of %d chunks: the HNSW index is rebuilt afterwards", planned)
        await db.execute("DROP INDEX IF EXISTS course_chunks_embedding_hnsw")
    try:
        await _embed_and_write(db, cache, settings, course_id, model_id, plans, progress, report)
    finally:
        if bulk:
            built = time.perf_counter()
            await ensure_search_index(db, settings)
            report.index_build_seconds += time.perf_counter() - built
    if plans:
        await _finish(db, course_id, plans)
    async with db.connection() as conn:
        report.versions[course_key] = int(
            await fetch_value(
                conn, "SELECT content_version FROM courses WHERE id = %s", (course_id,)
            )
        )
    report.courses.append(course_key)
    report.provider_calls += cache.stats.provider_calls - calls_before
    report.cache_hits += cache.stats.hits - hits_before
    report.seconds += time.perf_counter() - started


async def ensure_search_index(db: Database, settings: Settings) -> None:
    """Create the HNSW index if it is missing (after a bulk load, or one that crashed).

    A plain ``CREATE INDEX`` blocks writes to the table, not reads; only
    reindex writes there, and it holds the reindex lock.
    """
    async with db.transaction() as conn:
        # No statement timeout: a 100,000-chunk build takes most of a minute here.
        await conn.execute(
            "SELECT set_config('maintenance_work_mem', %s, true),"
            " set_config('max_parallel_maintenance_workers', %s, true),"
            " set_config('statement_timeout', '0', true)",
            (f"{settings.hnsw_build_memory_mb}MB", str(settings.hnsw_build_workers)),
        )
        await conn.execute(HNSW_INDEX_SQL)


async def _plan(
    db: Database, settings: Settings, course_key: str, model_id: str, full: bool
) -> tuple[int, int, list[_Plan], int, int]:
    """Course id, topic count, what to embed/keep/delete per topic, the table's size,
    and the chunks of the topics left alone (kept as they are)."""
    async with db.connection() as conn:
        course_id = await fetch_value(
            conn, "SELECT id FROM courses WHERE course_key = %s", (course_key,)
        )
        if course_id is None:
            raise NotFound(f"no course with key {course_key!r}: import it first")
        topics = await fetch_all(
            conn,
            TopicRow,
            "SELECT id, module_number, title, body, content_hash, indexed_signature FROM topics "
            "WHERE course_id = %s ORDER BY module_number, position",
            (course_id,),
        )
        todo = [
            t
            for t in topics
            if full or t.indexed_signature != topic_signature(settings, model_id, t.content_hash)
        ]
        stored = (
            await fetch_all(
                conn,
                StoredChunk,
                "SELECT id, topic_id, content_hash, embedding_model FROM course_chunks "
                "WHERE topic_id = ANY(%s)",
                ([t.id for t in todo],),
            )
            if todo
            else []
        )
        stored_total = int(await fetch_value(conn, "SELECT count(*) FROM course_chunks"))
        planned = {t.id for t in todo}
        skipped = [t.id for t in topics if t.id not in planned]
        untouched = (
            int(
                await fetch_value(
                    conn, "SELECT count(*) FROM course_chunks WHERE topic_id = ANY(%s)", (skipped,)
                )
            )
            if skipped
            else 0
        )
    # Stored chunks by topic and hash; chunks from another model can never be kept.
    by_topic: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    foreign: dict[int, list[int]] = defaultdict(list)
    for row in stored:
        if row.embedding_model == model_id:
            by_topic[row.topic_id][row.content_hash].append(row.id)
        else:
            foreign[row.topic_id].append(row.id)

    chunked = await _chunk_all(todo, settings)
    plans: list[_Plan] = []
    for topic, chunks in zip(todo, chunked, strict=True):
        available = {h: list(ids) for h, ids in by_topic[topic.id].items()}
        keep: dict[int, int] = {}
        new: list[int] = []
        for chunk in chunks:
            ids = available.get(chunk.content_hash)
            if ids and not full:
                keep[chunk.index] = ids.pop()
            else:
                new.append(chunk.index)
        # What was not kept is stale (with --full, nothing is kept).
        delete = [i for ids in available.values() for i in ids] + foreign[topic.id]
        plans.append(
            _Plan(
                topic,
                topic_signature(settings, model_id, topic.content_hash),
                chunks,
                keep,
                delete,
                new,
            )
        )
    return int(course_id), len(topics), plans, stored_total, untouched


async def _chunk_all(topics: list[TopicRow], settings: Settings) -> list[list[Chunk]]:
    """Chunk topics on two threads, off the event loop.

    tiktoken releases the GIL while it encodes, so two threads chunk about
    1.7 times as fast as one; a big course's chunking would otherwise stall
    the loop (a worker's heartbeats, other jobs) for seconds.
    """

    def chunk(topic: TopicRow) -> list[Chunk]:
        return chunk_topic(
            topic.body,
            title=topic.title,
            target_tokens=settings.chunk_target_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
        )

    if len(topics) <= 2:
        return [chunk(t) for t in topics]
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="chunker") as pool:
        return list(await asyncio.gather(*(loop.run_in_executor(pool, chunk, t) for t in topics)))


async def _embed_and_write(
    db: Database,
    cache: EmbeddingCache,
    settings: Settings,
    course_id: int,
    model_id: str,
    plans: list[_Plan],
    progress: Progress | None,
    report: ReindexReport,
) -> None:
    planned = sum(len(p.new) for p in plans)
    done = 0
    if progress:
        progress(0, planned)
    # Groups of whole topics of about 8 provider batches: full batches, bounded memory.
    groups: list[list[_Plan]] = [[]]
    size = 0
    for plan in plans:
        if size >= settings.embed_batch_size * 8:
            groups.append([])
            size = 0
        groups[-1].append(plan)
        size += len(plan.new)

    async def embed(group: list[_Plan]) -> Vectors:
        return await cache.embed([p.chunks[i].embed_text for p in group for i in p.new])

    # The next group is embedded while this one is written: provider round trips
    # and database writes overlap instead of taking turns.
    pending = asyncio.create_task(embed(groups[0]))
    try:
        for n, group in enumerate(groups):
            vectors = await pending
            if n + 1 < len(groups):
                pending = asyncio.create_task(embed(groups[n + 1]))
            offset = 0
            for p in group:
                await _write_topic(
                    db, course_id, model_id, p, vectors[offset : offset + len(p.new)]
                )
                offset += len(p.new)
                report.chunks_added += len(p.new)
                report.chunks_kept += len(p.keep)
                report.chunks_deleted += len(p.delete)
                report.topics_changed += 1
                done += len(p.new)
                if progress:
                    progress(done, planned)
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending


async def _write_topic(
    db: Database, course_id: int, model_id: str, plan: _Plan, vectors: np.ndarray
) -> None:
    # Pipeline mode sends each group of statements in one round trip (COPY
    # cannot be pipelined, so it sits between two groups).
    async with db.transaction() as conn:
        async with conn.pipeline():
            await _write_topic_head(conn, plan)
        if plan.delete or plan.new:
            # In the same transaction: no cached answer outlives a chunk it cites.
            await semantic_cache.evict(conn, course_id, plan.delete)
        if plan.new:
            await _copy_chunks(
                conn,
                course_id,
                plan.topic.id,
                plan.topic.module_number,
                plan.topic.title,
                model_id,
                [plan.chunks[i] for i in plan.new],
                vectors,
            )


async def _finish(db: Database, course_id: int, plans: list[_Plan]) -> None:
    """One transaction at the end of a run: every written topic's signature, and one
    ``content_version`` bump for the run (not one per topic)."""
    async with db.transaction() as conn, conn.pipeline():
        await conn.execute(
            "UPDATE topics t SET indexed_signature = s.signature"
            " FROM unnest(%s::bigint[], %s::text[]) AS s(id, signature) WHERE t.id = s.id",
            ([p.topic.id for p in plans], [p.signature for p in plans]),
        )
        await conn.execute(
            "UPDATE courses SET content_version = content_version + 1, updated_at = now()"
            " WHERE id = %s",
            (course_id,),
        )
        await refresh_lexeme_statistics(conn, course_id)


#: The course's lexeme statistics for hybrid retrieval (sql/migrations/0011), rebuilt
#: in the run's last transaction: one pass of ts_stat over the course's chunks
#: (about 0.1 s for 10,000 chunks).
LEXEME_STATISTICS_SQL = (
    "DELETE FROM course_lexemes WHERE course_id = %(course_id)s",
    "INSERT INTO course_lexemes (course_id, lexeme, chunks)"
    " SELECT %(course_id)s, word, ndoc FROM ts_stat(format("
    "'SELECT lexemes FROM course_chunks WHERE course_id = %%s', %(course_id)s::bigint))",
    "UPDATE courses SET lexeme_chunks ="
    " (SELECT count(*) FROM course_chunks WHERE course_id = %(course_id)s)"
    " WHERE id = %(course_id)s",
)


async def refresh_lexeme_statistics(conn: Conn, course_id: int) -> None:
    """Rebuild one course's lexeme statistics, in the caller's transaction."""
    for statement in LEXEME_STATISTICS_SQL:
        await conn.execute(statement, {"course_id": course_id})


async def _write_topic_head(conn: Conn, plan: _Plan) -> None:
    """Delete stale chunks and renumber kept ones."""
    # Chunks are derived data: a crash that loses the last few commits only
    # means the next run redoes those topics (their signatures went with
    # them), so the commit need not wait for the WAL flush. On a small disk
    # that wait is most of the cost of a topic.
    await conn.execute("SET LOCAL synchronous_commit = off")
    if plan.delete:
        await conn.execute("DELETE FROM course_chunks WHERE id = ANY(%s)", (plan.delete,))
    if plan.keep:
        # Kept chunks may have moved (a paragraph inserted before them).
        kept = [(row_id, plan.chunks[i]) for i, row_id in plan.keep.items()]
        await conn.execute(
            """
            UPDATE course_chunks c
               SET chunk_index = u.chunk_index, char_start = u.char_start, char_end = u.char_end
              FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::int[])
                   AS u(id, chunk_index, char_start, char_end)
             WHERE c.id = u.id
               AND (c.chunk_index, c.char_start, c.char_end)
                   IS DISTINCT FROM (u.chunk_index, u.char_start, u.char_end)
            """,
            (
                [r for r, _ in kept],
                [c.index for _, c in kept],
                [c.start for _, c in kept],
                [c.end for _, c in kept],
            ),
        )


async def _copy_chunks(
    conn: Conn,
    course_id: int,
    topic_id: int,
    module_number: int,
    topic_title: str,
    model_id: str,
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
) -> None:
    """Insert chunks with binary COPY: several times faster than INSERTs for vectors.
    PostgreSQL derives each row's ``lexemes`` (full-text search) from the title,
    headings and text (sql/migrations/0009)."""
    async with (
        conn.cursor() as cur,
        cur.copy(
            "COPY course_chunks (course_id, topic_id, module_number, topic_title, chunk_index,"
            " heading_path, text, char_start, char_end, token_count, content_hash,"
            " embedding_model, embedding) FROM STDIN (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(
            [
                "int8",
                "int8",
                "int4",
                "text",
                "int4",
                "text[]",
                "text",
                "int4",
                "int4",
                "int4",
                "text",
                "text",
                "vector",
            ]
        )
        for chunk, vector in zip(chunks, vectors, strict=True):
            await copy.write_row(
                (
                    course_id,
                    topic_id,
                    module_number,
                    topic_title,
                    chunk.index,
                    list(chunk.heading_path),
                    chunk.text,
                    chunk.start,
                    chunk.end,
                    chunk.token_count,
                    chunk.content_hash,
                    model_id,
                    vector,
                )
            )
