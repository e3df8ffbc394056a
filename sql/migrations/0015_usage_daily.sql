-- Model tokens per UTC day, course, user and model, added to in the transaction that
-- stores each answer (rag/learners/usage.py): what the admin usage report sums and
-- prices, per user, per course or per day, without reading the jobs.
CREATE TABLE usage_daily (
    day               date   NOT NULL,
    course_id         bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    user_id           text   NOT NULL,
    model             text   NOT NULL,
    jobs              bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, course_id, user_id, model)
);
