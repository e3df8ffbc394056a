-- The reconciler looks for queued and running jobs separately, each oldest first
-- (rag/recovery.py, CLAIM_SQL): one range per status. The index on updated_at
-- alone made the `running` scan step over every old queued row of a backlog.
-- The partial predicate keeps finished jobs, nearly all rows, out of it.
CREATE INDEX assistant_jobs_stuck_idx ON assistant_jobs (status, updated_at)
    WHERE status IN ('queued', 'running');
DROP INDEX assistant_jobs_unfinished_idx;
