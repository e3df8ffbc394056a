-- Which worker process runs a job: the answer pipeline records it when it marks
-- the job running. The reconciler (workers/reconciler.py) treats a running job
-- whose worker's heartbeat key has expired as lost at once, instead of waiting
-- for the job to look old (which, with a killed worker mid-answer, took up to two
-- RECONCILE_RUNNING_AFTER periods). NULL for rows from before this column, and
-- for jobs run by something other than a worker process (tests' in-process runs):
-- those keep the age rule.
ALTER TABLE assistant_jobs ADD COLUMN worker text;
