-- A user's unfinished jobs, for the in-flight cap (MAX_INFLIGHT_PER_USER) that the
-- job-creating statement checks on every question (rag/jobs.py). Partial, so it
-- holds only queued and running rows: small, and an index-only count per user.
-- (assistant_jobs_unfinished_idx is on updated_at, for the reconciler's scan.)
CREATE INDEX assistant_jobs_inflight_idx ON assistant_jobs (user_id)
    WHERE status IN ('queued', 'running');
