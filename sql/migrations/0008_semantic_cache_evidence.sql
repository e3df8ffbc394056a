-- Invalidation by evidence: a cached answer records the chunks it was built from
-- (the ids of the chunks in its prompt), and a reindex or an import evicts exactly
-- the answers whose chunks it deleted or replaced, instead of every answer of the
-- course's old content_version. An answer built from no chunk ("the course does
-- not cover this") is evicted by any content change: new content may cover it.
-- Rows cached before this column have no recorded evidence and go on the first
-- change, as before. Lookups no longer filter by content_version, so the index
-- serves (course, model).
ALTER TABLE semantic_cache ADD COLUMN evidence bigint[] NOT NULL DEFAULT '{}';
CREATE INDEX semantic_cache_evidence_idx ON semantic_cache USING gin (evidence);
DROP INDEX semantic_cache_course_idx;
CREATE INDEX semantic_cache_course_idx ON semantic_cache (course_id, embedding_model);
