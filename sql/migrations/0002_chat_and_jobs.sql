-- Chat history, the durable job record, the semantic answer cache, activity events.
CREATE TABLE chat_sessions (
    id                    uuid PRIMARY KEY,
    user_id               text NOT NULL,
    course_id             bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    title                 text NOT NULL DEFAULT '',
    summary               text NOT NULL DEFAULT '',
    -- How many messages the summary covers; the summary job folds in the rest.
    summary_message_count integer NOT NULL DEFAULT 0,
    message_count         integer NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
-- Session list: one user's sessions in a course, newest first, keyset-paginated.
CREATE INDEX chat_sessions_user_course_idx ON chat_sessions (user_id, course_id, updated_at DESC, id DESC);

CREATE TABLE assistant_jobs (
    id              uuid PRIMARY KEY,
    user_id         text NOT NULL,
    course_id       bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    session_id      uuid NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    question        text NOT NULL,
    idempotency_key text,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    cancel_requested boolean NOT NULL DEFAULT false,
    answer          text,
    citations       jsonb,
    usage           jsonb,
    cached          boolean NOT NULL DEFAULT false,
    error           jsonb,
    timings         jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX assistant_jobs_idempotency_idx ON assistant_jobs (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The reconciler scans only unfinished jobs.
CREATE INDEX assistant_jobs_unfinished_idx ON assistant_jobs (updated_at)
    WHERE status IN ('queued', 'running');

CREATE TABLE chat_messages (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    job_id     uuid NOT NULL,
    role       text NOT NULL CHECK (role IN ('user', 'assistant')),
    content    text NOT NULL,
    citations  jsonb NOT NULL DEFAULT '[]'::jsonb,
    usage      jsonb,
    timings    jsonb,
    cached     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- One question and one answer per job: a job that runs twice stores one answer.
    CONSTRAINT chat_messages_job_role_key UNIQUE (job_id, role)
);
-- Recent turns and message pages of a session (by role, newest first).
CREATE INDEX chat_messages_session_role_idx ON chat_messages (session_id, role, id);
CREATE INDEX chat_messages_session_idx ON chat_messages (session_id, id DESC);

CREATE TABLE semantic_cache (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id       bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    content_version integer NOT NULL,
    question        text NOT NULL,
    question_hash   text NOT NULL,
    embedding_model text NOT NULL,
    embedding       vector(1536) NOT NULL,
    answer          text NOT NULL,
    citations       jsonb NOT NULL DEFAULT '[]'::jsonb,
    usage           jsonb,
    hits            integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_hit_at     timestamptz,
    UNIQUE (course_id, content_version, question_hash)
);
CREATE INDEX semantic_cache_embedding_hnsw ON semantic_cache
    USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);
CREATE INDEX semantic_cache_course_idx ON semantic_cache (course_id, content_version);

CREATE TABLE learner_activity_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    text NOT NULL,
    course_id  bigint REFERENCES courses (id) ON DELETE CASCADE,
    event_type text NOT NULL,
    payload    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX learner_activity_events_type_time_idx ON learner_activity_events (event_type, created_at);
