-- Follow-ups rewritten into standalone questions (rag/rewrite.py): the rewrite is
-- what retrieval searched and the semantic cache compared; null for a question
-- that was asked standalone.
ALTER TABLE assistant_jobs ADD COLUMN standalone_question text;
-- The evidence check of the semantic cache (rag/semantic_cache.py): the chunk ids
-- the cached question retrieved, best first. A new question is served the cached
-- answer only if it retrieves (nearly) the same chunks. Older rows have none and
-- are never served again; the next content change or the cache's own eviction
-- removes them.
ALTER TABLE semantic_cache ADD COLUMN retrieved bigint[] NOT NULL DEFAULT '{}';
