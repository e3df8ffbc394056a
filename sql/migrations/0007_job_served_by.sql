-- How a succeeded job's answer was served: 'generated' (a model call),
-- 'semantic_cache' (a cached answer to a similar question) or 'followed' (the
-- answer of an identical question in flight, single flight), and from what:
-- {"cached_question_id", "similarity"} or {"job_id"}. `cached` alone could not
-- tell a followed answer (no model call, zero usage) from a generated one.
ALTER TABLE assistant_jobs
    ADD COLUMN served_by text CHECK (served_by IN ('generated', 'semantic_cache', 'followed')),
    ADD COLUMN served_from jsonb;
