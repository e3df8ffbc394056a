-- Hybrid retrieval: full-text search next to HNSW (rag/search.py, HYBRID_SQL).
-- A chunk's lexemes come from its topic title and heading path (weight A) and its
-- text (weight B), with English stemming. The title is denormalized onto the
-- chunk (like course_id) so that the tsvector can be a generated column: it is
-- computed by PostgreSQL on every insert, binary COPY included, and can never
-- drift from the text. A title change changes every chunk's content hash (the
-- hash covers the embedded text, title included), so the rows are rewritten.
-- The wrapper function is IMMUTABLE, as a generated column needs: to_tsvector
-- with a fixed configuration is, array_to_string is only declared STABLE
-- because it serves every array type; for text[] it is deterministic.
ALTER TABLE course_chunks ADD COLUMN topic_title text NOT NULL DEFAULT '';
UPDATE course_chunks c SET topic_title = t.title FROM topics t WHERE t.id = c.topic_id;

CREATE FUNCTION course_chunk_lexemes(title text, headings text[], body text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT setweight(to_tsvector('english'::regconfig,
                                 title || ' ' || array_to_string(headings, ' ')), 'A')
        || setweight(to_tsvector('english'::regconfig, body), 'B')
$$;

ALTER TABLE course_chunks
    ADD COLUMN lexemes tsvector
    GENERATED ALWAYS AS (course_chunk_lexemes(topic_title, heading_path, text)) STORED;
CREATE INDEX course_chunks_lexemes_idx ON course_chunks USING gin (lexemes);
