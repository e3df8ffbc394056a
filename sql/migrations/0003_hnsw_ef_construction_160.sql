-- Rebuild the retrieval index with ef_construction = 160 (was 64; m stays 16).
-- At 64, the graph built over course-by-course, topic-by-topic loaded chunks
-- left about 4.5% of 100,000 clustered vectors unreachable from the entry
-- point (a stored vector searched for itself at ef_search = 320 did not come
-- back), so recall@10 stalled at 0.90-0.91 whatever ef_search. At 160: recall
-- 0.97-0.99 at ef_search 40-320, for about 1.6x the build time. See
-- docs/benchmarks.md (Retrieval) and docs/decisions.md.
-- rag/indexing.py (HNSW_INDEX_SQL) keeps the same definition for bulk rebuilds.
-- On a populated table this builds the whole index inside the migration (about
-- as long as a bulk reindex's build, longer with the default maintenance_work_mem).
DROP INDEX IF EXISTS course_chunks_embedding_hnsw;
CREATE INDEX course_chunks_embedding_hnsw ON course_chunks
    USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 160);
