-- Feedback on answers and the activity record the instructors' insights read (issue 11).
-- One feedback per job (a second replaces the first), by the job's owner.
CREATE TABLE job_feedback (
    job_id     uuid PRIMARY KEY REFERENCES assistant_jobs (id) ON DELETE CASCADE,
    user_id    text NOT NULL,
    course_id  bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    rating     text NOT NULL CHECK (rating IN ('up', 'down')),
    comment    text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The feedback page: a course's feedback, newest first, keyset-paginated.
CREATE INDEX job_feedback_course_idx ON job_feedback (course_id, updated_at DESC, job_id DESC);

-- Which job's answer an entry holds, and whether a thumbs-down took it out of service
-- (kept for review rather than deleted; lookups skip flagged entries).
ALTER TABLE semantic_cache
    ADD COLUMN job_id uuid,
    ADD COLUMN flagged_at timestamptz;
CREATE INDEX semantic_cache_job_idx ON semantic_cache (job_id) WHERE job_id IS NOT NULL;

-- The insight queries read one course's events of one type over a period.
CREATE INDEX learner_activity_events_course_type_time_idx
    ON learner_activity_events (course_id, event_type, created_at DESC, id DESC);
