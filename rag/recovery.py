"""The reconciler's side of the job record: unfinished jobs that may have been lost.

PostgreSQL is the record and Redis only the queue, so a Redis flush, a killed
worker or a job that crashed outside the answer pipeline leaves rows
``queued`` or ``running`` that nothing will run. The reconciler
(``workers/reconciler.py``) claims the oldest of them here, checks the queue
for each, and queues again, or fails, what was lost. Running a job twice is
safe: the answer pipeline stores one answer per job (``rag/answers.py``).
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from rag.db import Database
from rag.jobs import JobStatus

#: The error a job gets when it started ``RECONCILE_MAX_ATTEMPTS`` times and never
#: finished: its workers died or timed out each time, so another run would likely too.
ATTEMPTS_EXHAUSTED = "attempts_exhausted"


class StuckJob(msgspec.Struct, frozen=True):
    id: uuid.UUID
    status: JobStatus
    attempts: int
    #: The worker process that last started it (its heartbeat names it), if recorded.
    worker: str | None = None


# Oldest first per status (assistant_jobs_stuck_idx serves both scans), running
# ones first since a dead worker's job has been waiting longest. A running job
# that names its worker is looked at once it is ``dead_after`` old (the worker's
# heartbeat then says whether it is alive); one that does not, only once it is
# ``running_after`` old (its age is all there is to go by). Claiming bumps
# updated_at in the same statement: a concurrent reconciler skips the locked rows
# and then no longer sees them as overdue, and a job that is only waiting its
# turn in a long queue is looked at again one deadline later, not on every run,
# so a bounded batch cannot get stuck on the same rows.
CLAIM_SQL = """
WITH running AS (
    SELECT id FROM assistant_jobs
     WHERE status = 'running'
       AND updated_at < now() - make_interval(secs => %(dead_after)s)
       AND (worker IS NOT NULL
            OR updated_at < now() - make_interval(secs => %(running_after)s))
     ORDER BY updated_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), queued AS (
    SELECT id FROM assistant_jobs
     WHERE status = 'queued'
       AND updated_at < now() - make_interval(secs => %(queued_after)s)
     ORDER BY updated_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), claimed AS (
    SELECT id FROM running UNION ALL SELECT id FROM queued LIMIT %(limit)s
)
UPDATE assistant_jobs j
   SET updated_at = now()
  FROM claimed
 WHERE j.id = claimed.id
RETURNING j.id, j.status, j.attempts, j.worker
"""

_FAIL_SQL = """
UPDATE assistant_jobs
   SET status = 'failed', error = %(error)s, finished_at = now(), updated_at = now()
 WHERE id = ANY(%(ids)s) AND status = 'running'
RETURNING id
"""


async def claim_stuck(
    db: Database,
    *,
    queued_after: float,
    running_after: float,
    dead_after: float,
    limit: int,
) -> list[StuckJob]:
    """Up to ``limit`` jobs queued longer than ``queued_after`` seconds, or running
    longer than ``dead_after`` (with a worker recorded) or ``running_after``
    (without), each claimed for the next deadline."""
    params = {
        "queued_after": queued_after,
        "running_after": running_after,
        "dead_after": min(dead_after, running_after),
        "limit": limit,
    }
    return await db.fetch_all(StuckJob, CLAIM_SQL, params)


def exhausted_error(attempts: int) -> dict[str, Any]:
    return {
        "code": ATTEMPTS_EXHAUSTED,
        "message": (
            f"the question was started {attempts} times and never finished (the workers "
            "answering it stopped or timed out); please ask again"
        ),
        # The service already tried again, automatically; another try is the learner's call.
        "retryable": False,
    }


async def fail_exhausted(db: Database, jobs: list[StuckJob]) -> list[uuid.UUID]:
    """Mark these running jobs failed with :func:`exhausted_error`; the ids it changed."""
    failed: list[uuid.UUID] = []
    for attempts in sorted({job.attempts for job in jobs}):
        ids = [job.id for job in jobs if job.attempts == attempts]
        error = msgspec.json.encode(exhausted_error(attempts)).decode()
        rows = await db.fetch_all(_Id, _FAIL_SQL, {"ids": ids, "error": error})
        failed += [row.id for row in rows]
    return failed


class _Id(msgspec.Struct, frozen=True):
    id: uuid.UUID
