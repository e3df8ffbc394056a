-- Courses, their topics, enrollments and the retrieval index.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE courses (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_key      text NOT NULL UNIQUE CHECK (course_key ~ '^[a-z0-9][a-z0-9-]{0,63}$'),
    title           text NOT NULL,
    description     text NOT NULL DEFAULT '',
    modules         jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Bumped by a reindex that changed any chunk; the semantic answer cache is
    -- keyed by it, so changed content never serves an answer built on old text.
    content_version integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE topics (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id     bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    topic_key     text NOT NULL,
    module_number integer NOT NULL CHECK (module_number >= 1),
    position      integer NOT NULL CHECK (position >= 1),
    title         text NOT NULL,
    body          text NOT NULL,
    content_hash  text NOT NULL,
    -- Signature of what the chunks were last built from (content hash, chunking
    -- parameters, embedding model): equal means the topic can be skipped whole.
    indexed_signature text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (course_id, topic_key),
    -- Serves the topic list (module, position order) as well as uniqueness;
    -- deferrable so an import can swap two positions inside one transaction.
    CONSTRAINT topics_course_order_key UNIQUE (course_id, module_number, position)
        DEFERRABLE INITIALLY IMMEDIATE
);

CREATE TABLE enrollments (
    user_id    text NOT NULL,
    course_id  bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    role       text NOT NULL DEFAULT 'learner' CHECK (role IN ('learner', 'instructor')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, course_id)
);
CREATE INDEX enrollments_course_idx ON enrollments (course_id);

CREATE TABLE course_chunks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Denormalized from topics so retrieval filters by course without a join.
    -- Deliberately neither indexed nor a foreign key (chunks go with their
    -- topic, and topics with their course): a btree on it would tempt the
    -- planner into "all chunks of the course, then sort", an exact scan that
    -- grows with the course, instead of the HNSW walk. See docs/decisions.md.
    course_id       bigint NOT NULL,
    topic_id        bigint NOT NULL REFERENCES topics (id) ON DELETE CASCADE,
    chunk_index     integer NOT NULL,
    heading_path    text[] NOT NULL DEFAULT '{}',
    text            text NOT NULL,
    char_start      integer NOT NULL,
    char_end        integer NOT NULL,
    token_count     integer NOT NULL,
    content_hash    text NOT NULL,
    embedding_model text NOT NULL,
    -- Dimension follows EMBEDDING_DIMENSIONS; `reindex --all --full` changes it.
    embedding       vector(1536) NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- PostgreSQL sizes a parallel index build by the heap, and 6 KiB vectors live
-- in TOAST, so the heap looks too small to ever get a worker: ask for them
-- explicitly (the build still takes at most max_parallel_maintenance_workers,
-- which HNSW_BUILD_WORKERS sets). Measured: 1.9x faster HNSW builds here.
ALTER TABLE course_chunks SET (parallel_workers = 8);
-- The reindex diff looks chunks up by topic and hash (and deletes cascade by topic).
CREATE INDEX course_chunks_topic_hash_idx ON course_chunks (topic_id, content_hash);
-- HNSW, cosine distance, m = 16 and ef_construction = 64 (pgvector's defaults):
-- measured as the best build-speed/recall trade-off here, see docs/decisions.md.
-- rag/indexing.py keeps the same definition to rebuild it after a bulk load.
CREATE INDEX course_chunks_embedding_hnsw ON course_chunks
    USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);
