-- Progress and module gating (rag/progress.py, issue 11).
-- How a course's modules unlock (course.yaml's `unlock` and per-module `requires`)
-- and its pedagogy mode (`mode`, per course and per module).
ALTER TABLE courses
    ADD COLUMN unlock text NOT NULL DEFAULT 'open' CHECK (unlock IN ('open', 'sequential')),
    ADD COLUMN mode text NOT NULL DEFAULT 'answer' CHECK (mode IN ('answer', 'hint')),
    -- {"<module number>": {"requires": [n, ...] | null, "mode": "answer" | "hint" | null}}
    ADD COLUMN module_rules jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Retrieval filters by module as well as course when a learner has not unlocked them
-- all: the module is denormalized onto the chunk like the course and the topic title.
-- Null (a row written outside indexing) means unknown: hidden whenever gating applies.
ALTER TABLE course_chunks ADD COLUMN module_number integer;
UPDATE course_chunks c SET module_number = t.module_number FROM topics t WHERE t.id = c.topic_id;

-- What the platform reports a learner has completed. One row per learner and topic;
-- the primary key serves the one query that reads it (a learner's rows in a course,
-- joined to the course's topics), and the topic index the cascade from topics.
CREATE TABLE topic_progress (
    course_id    bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    user_id      text NOT NULL,
    topic_id     bigint NOT NULL REFERENCES topics (id) ON DELETE CASCADE,
    completed    boolean NOT NULL,
    completed_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (course_id, user_id, topic_id)
);
CREATE INDEX topic_progress_topic_idx ON topic_progress (topic_id);

-- A cached answer is scoped by the modules its question could see ('' when the
-- learner had every module): an answer built with a module is never served to a
-- learner who has not unlocked it, nor one built without it ("the course does not
-- cover this") to a learner who has.
ALTER TABLE semantic_cache ADD COLUMN gate text NOT NULL DEFAULT '';
ALTER TABLE semantic_cache
    DROP CONSTRAINT semantic_cache_course_id_content_version_question_hash_key,
    ADD CONSTRAINT semantic_cache_scope_question_key
        UNIQUE (course_id, content_version, gate, question_hash);
