"""The durable job record: ``assistant_jobs`` rows and their sessions.

A question becomes a row here *before* anything is queued, so the row is the
truth about a question whatever happens to Redis. Creating one is a single
statement (session and job in one round trip); every read is scoped by owner,
so another user's job is indistinguishable from a missing one.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Literal

import msgspec
import psycopg

from rag.platform.db import Conn, Database, fetch_one, fetch_value
from rag.platform.errors import TooManyInflight

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Status(StrEnum):
    """A job's status (``assistant_jobs.status``); :data:`JobStatus` spells the same
    values for the API's schema (a test keeps the two equal)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The statuses a job ends in: no transition leaves them (see "The lifecycle" below).
FINISHED: frozenset[str] = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
ServedBy = Literal["generated", "semantic_cache", "followed"]


class Job(msgspec.Struct, frozen=True):
    id: uuid.UUID
    user_id: str
    course_id: int
    session_id: uuid.UUID
    question: str
    status: JobStatus
    cached: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    answer: str | None
    citations: Any
    usage: Any
    error: Any
    #: How the answer was served: generated, semantic_cache or followed (succeeded jobs).
    served_by: ServedBy | None = None
    #: What it was served from: {"cached_question_id", "similarity", "verified"} or
    #: {"job_id"}.
    served_from: Any = None
    #: The question as retrieval and the semantic cache read it: a follow-up rewritten
    #: to stand alone (rag/answering/rewrite.py); null when it was asked standalone.
    standalone_question: str | None = None
    created: bool = False
    #: Runs started so far (only read by the worker, from its start statement).
    attempts: int = 0


def final_event(job: Job) -> tuple[str, dict[str, Any]]:
    """The terminal event (``done`` or ``error``) that describes a finished job."""
    if job.status == "succeeded":
        return "done", {
            "answer": job.answer,
            "citations": job.citations,
            "usage": job.usage,
            "cached": job.cached,
            "served_by": job.served_by,
            "served_from": job.served_from,
        }
    return "error", job.error or {
        "code": job.status,
        "message": f"the job was {job.status}",
        "retryable": False,
    }


class SessionNotFound(Exception):
    """The given session does not exist, is another user's, or is another course's."""


class CourseGone(Exception):
    """The course was deleted after its id was looked up (a stale cache entry)."""


JOB_COLUMNS = (
    "id, user_id, course_id, session_id, question, status, cached, created_at, started_at,"
    " finished_at, answer, citations, usage, error, served_by, served_from, standalone_question"
)

# One round trip: create the session when none is given, insert the job unless
# the idempotency key was used before or the user already has max_inflight jobs
# queued or running (0: no cap), and return the row either way. The count reads
# at most max_inflight entries of assistant_jobs_inflight_idx. Two requests of
# one user racing can both pass it (each counts before the other commits): a
# soft cap, exceeded by at most the requests in flight at that instant.
CREATE_JOB_SQL = f"""
WITH previous AS (
    SELECT {JOB_COLUMNS} FROM assistant_jobs
     WHERE %(idempotency_key)s::text IS NOT NULL
       AND user_id = %(user_id)s AND idempotency_key = %(idempotency_key)s
), admitted AS (
    SELECT NOT EXISTS (SELECT 1 FROM previous)
           AND (%(max_inflight)s::int = 0
                OR (SELECT count(*) FROM (
                        SELECT 1 FROM assistant_jobs
                         WHERE user_id = %(user_id)s AND status IN ('queued', 'running')
                         LIMIT %(max_inflight)s::int) unfinished) < %(max_inflight)s::int) AS ok
), new_session AS (
    INSERT INTO chat_sessions (id, user_id, course_id, title)
    SELECT %(session_id)s, %(user_id)s, %(course_id)s, left(%(question)s, 80)
     WHERE %(new_session)s AND (SELECT ok FROM admitted)
    RETURNING id
), inserted AS (
    INSERT INTO assistant_jobs (id, user_id, course_id, session_id, question, idempotency_key)
    SELECT %(job_id)s, %(user_id)s, %(course_id)s, %(session_id)s, %(question)s,
           %(idempotency_key)s
     WHERE (SELECT ok FROM admitted)
       AND (EXISTS (SELECT 1 FROM new_session)
            OR EXISTS (SELECT 1 FROM chat_sessions
                        WHERE id = %(session_id)s AND user_id = %(user_id)s
                          AND course_id = %(course_id)s))
    ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {JOB_COLUMNS}
)
SELECT {JOB_COLUMNS}, true AS created FROM inserted
UNION ALL
SELECT {JOB_COLUMNS}, false AS created FROM previous
"""  # noqa: S608 - the interpolated text is a constant column list

GET_JOB_SQL = f"SELECT {JOB_COLUMNS} FROM assistant_jobs WHERE id = %s AND user_id = %s"  # noqa: S608

_IDEMPOTENT_SQL = (
    f"SELECT {JOB_COLUMNS} FROM assistant_jobs"  # noqa: S608
    " WHERE user_id = %s AND idempotency_key = %s"
)

_OWN_SESSION_SQL = "SELECT 1 FROM chat_sessions WHERE id = %s AND user_id = %s AND course_id = %s"


async def create_job(
    db: Database,
    *,
    user_id: str,
    course_id: int,
    question: str,
    session_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    max_inflight: int = 0,
) -> Job:
    """The job for this question: a new one (``created``), or the one this user's
    ``idempotency_key`` already made (returned even when the user is at the cap).
    Raises :class:`SessionNotFound`, :class:`CourseGone`, or :class:`TooManyInflight`
    when the user already has ``max_inflight`` jobs queued or running (0: no cap)."""
    params = {
        "job_id": uuid.uuid4(),
        "user_id": user_id,
        "course_id": course_id,
        "question": question,
        "session_id": session_id or uuid.uuid4(),
        "new_session": session_id is None,
        "idempotency_key": idempotency_key,
        "max_inflight": max_inflight,
    }
    # Autocommit: the one statement is atomic and costs one round trip (a
    # transaction block would add two). The price is an empty session left
    # behind when two requests race with the same idempotency key and no session.
    async with db.connection() as conn:
        try:
            job = await fetch_one(conn, Job, CREATE_JOB_SQL, params)
        except psycopg.errors.ForeignKeyViolation as exc:
            raise CourseGone(str(course_id)) from exc
        if job is None and idempotency_key is not None:
            # A concurrent request with the same key won the insert after this
            # statement's snapshot was taken: read it now that it is committed.
            job = await fetch_one(conn, Job, _IDEMPOTENT_SQL, (user_id, idempotency_key))
        # Nothing inserted: the cap refused it, or the session is not this user's
        # (only a given session can be missing; the rare failure path asks which).
        if (
            job is None
            and max_inflight > 0
            and (
                session_id is None
                or await fetch_value(conn, _OWN_SESSION_SQL, (session_id, user_id, course_id))
            )
        ):
            raise TooManyInflight(
                f"you already have {max_inflight} questions queued or being answered, the "
                "most allowed at once: wait for one to finish",
                details={"limit": max_inflight},
            )
    if job is None:
        raise SessionNotFound(str(session_id))
    return job


async def get_job(db: Database, job_id: uuid.UUID, user_id: str) -> Job | None:
    """The job if it exists and belongs to ``user_id``."""
    return await db.fetch_one(Job, GET_JOB_SQL, (job_id, user_id))


# A queued job cancelled here never runs, so its activity ("asked", "cancelled") is
# written here, in the same statement (rag/learners/activity.py).
_CANCEL_SQL = f"""
WITH before AS (
    SELECT id, status FROM assistant_jobs WHERE id = %(job_id)s AND user_id = %(user_id)s
       FOR UPDATE
), changed AS (
    UPDATE assistant_jobs j
       SET cancel_requested = true,
           status = CASE WHEN j.status = 'queued' THEN 'cancelled' ELSE j.status END,
           finished_at = CASE WHEN j.status = 'queued' THEN now() ELSE j.finished_at END,
           updated_at = now()
      FROM before b
     WHERE j.id = b.id
 RETURNING j.*, b.status AS previous
), recorded AS (
    INSERT INTO learner_activity_events (user_id, course_id, event_type, payload, created_at)
    SELECT c.user_id, c.course_id, v.event_type, jsonb_build_object('job_id', c.id), v.at
      FROM changed c,
           LATERAL (VALUES ('asked', c.created_at), ('cancelled', now())) AS v(event_type, at)
     WHERE c.previous = 'queued'
)
SELECT {JOB_COLUMNS} FROM changed
"""  # noqa: S608 - the interpolated text is a constant column list


async def request_cancel(db: Database, job_id: uuid.UUID, user_id: str) -> Job | None:
    """Cancel: a queued job becomes ``cancelled`` at once and never runs; a running
    one is flagged and stops at its next token batch; a finished one is unchanged."""
    return await db.fetch_one(Job, _CANCEL_SQL, {"job_id": job_id, "user_id": user_id})


# --- The lifecycle: a worker's transitions of one job, each guarded by the status it
# leaves. A job can run twice at once (at-least-once delivery, a reconciler requeue),
# and the first run to finish owns the outcome: a second run that fails after the
# first stored its answer must not turn the row to "failed", nor a late answer
# overwrite a stored one. The first to finish wins rather than the latest attempt, so
# a good answer from a run the reconciler thought dead is kept instead of a later
# failure. (The reconciler's claims and failures are the last section, guarded the same
# way.)

#: What the start returns of the job (``answers._begin`` builds a Job from them).
STARTED_COLUMNS: Final = (
    "id", "user_id", "course_id", "session_id", "question", "status", "cached", "created_at",
    "started_at", "finished_at", "answer", "citations", "usage", "error", "attempts",
)  # fmt: skip

# queued or running -> running (one more attempt, on a worker); no row when the job
# is unknown, finished, being cancelled or has its answer stored.
START_SQL = f"""
UPDATE assistant_jobs
   SET status = 'running', attempts = attempts + 1, worker = %s,
       started_at = coalesce(started_at, now()), updated_at = now()
 WHERE id = %s AND status IN ('queued', 'running') AND NOT cancel_requested
   AND NOT EXISTS (SELECT 1 FROM chat_messages m
                    WHERE m.job_id = assistant_jobs.id AND m.role = 'assistant')
RETURNING {", ".join(STARTED_COLUMNS)}
"""  # noqa: S608 (column names, our constant)

_REPAIR_SQL = """
UPDATE assistant_jobs j
   SET status = 'succeeded', answer = m.content, citations = m.citations, usage = m.usage,
       finished_at = coalesce(j.finished_at, now()), updated_at = now()
  FROM chat_messages m
 WHERE j.id = %s AND m.job_id = j.id AND m.role = 'assistant' AND j.status <> 'succeeded'
"""

_SUCCEED_SQL = """
UPDATE assistant_jobs
   SET status = 'succeeded', answer = %s, citations = %s, usage = %s,
       timings = %s, cached = %s, served_by = %s, served_from = %s,
       standalone_question = %s, finished_at = now(), updated_at = now()
 WHERE id = %s AND status = 'running'
"""


async def repair_succeeded(conn: Conn, job_id: uuid.UUID) -> None:
    """-> succeeded, from the stored answer: a run crashed between storing its answer
    and acknowledging the job."""
    await conn.execute(_REPAIR_SQL, (job_id,))


class Outcome(msgspec.Struct, frozen=True):
    """What a succeeded job records, each JSON value already encoded."""

    answer: str
    citations: str
    usage: str
    timings: str
    cached: bool
    served_by: ServedBy
    served_from: str | None
    standalone_question: str | None


async def succeed(conn: Conn, job_id: uuid.UUID, outcome: Outcome) -> psycopg.AsyncCursor[Any]:
    """running -> succeeded; the statement's ``rowcount`` is 0 (nothing written) when
    another run finished it. The cursor, not a bool: in a pipeline (the storing
    transaction, ``answers._store``) the count is known only after the sync."""
    return await conn.execute(
        _SUCCEED_SQL,
        (
            outcome.answer,
            outcome.citations,
            outcome.usage,
            outcome.timings,
            outcome.cached,
            outcome.served_by,
            outcome.served_from,
            outcome.standalone_question,
            job_id,
        ),
    )


# running -> failed or cancelled, and the activity record's "asked" and outcome events
# (rag/learners/activity.py) in the same statement: written once, by the run that made it so.
_END_RUNNING_SQL = """
WITH ended AS (
    UPDATE assistant_jobs
       SET status = %(status)s, error = %(error)s::jsonb, finished_at = now(),
           updated_at = now()
     WHERE id = %(job_id)s AND status = 'running'
 RETURNING id, user_id, course_id, created_at
)
INSERT INTO learner_activity_events (user_id, course_id, event_type, payload, created_at)
SELECT e.user_id, e.course_id, v.event_type, v.payload, v.at
  FROM ended e,
       LATERAL (VALUES ('asked', jsonb_build_object('job_id', e.id), e.created_at),
                       (%(status)s, jsonb_build_object('job_id', e.id, 'code', %(code)s::text),
                        now())) AS v(event_type, payload, at)
"""


async def _end_running(
    db: Database, job_id: uuid.UUID, status: Status, error: dict[str, Any] | None
) -> bool:
    changed = await db.execute(
        _END_RUNNING_SQL,
        {
            "job_id": job_id,
            "status": status.value,
            "error": None if error is None else msgspec.json.encode(error).decode(),
            "code": None if error is None else error.get("code"),
        },
    )
    return bool(changed)


async def cancel_running(db: Database, job_id: uuid.UUID) -> bool:
    """running -> cancelled (the learner's request, seen mid-stream); False when
    another run finished it first."""
    return await _end_running(db, job_id, Status.CANCELLED, None)


async def fail_running(db: Database, job_id: uuid.UUID, error: dict[str, Any]) -> bool:
    """running -> failed with ``error`` (our words, for the learner); False when another
    run finished it first."""
    return await _end_running(db, job_id, Status.FAILED, error)


# --- Stalled jobs: the reconciler's side of the record. PostgreSQL is the record and
# Redis only the queue, so a Redis flush, a killed worker or a job that crashed outside
# the answer pipeline leaves rows queued or running that nothing will run. The
# reconciler (workers/reconciler.py) claims the oldest of them here, checks the queue
# for each, and queues again (arq's side: the row is unchanged) or fails what was
# lost. Running a job twice is safe: the transitions above let the first run to
# finish own the outcome.

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
WITH failed AS (
    UPDATE assistant_jobs
       SET status = 'failed', error = %(error)s, finished_at = now(), updated_at = now()
     WHERE id = ANY(%(ids)s) AND status = 'running'
 RETURNING id, user_id, course_id, created_at
), recorded AS (
    INSERT INTO learner_activity_events (user_id, course_id, event_type, payload, created_at)
    SELECT f.user_id, f.course_id, v.event_type, v.payload, v.at
      FROM failed f,
           LATERAL (VALUES ('asked', jsonb_build_object('job_id', f.id), f.created_at),
                           ('failed', jsonb_build_object('job_id', f.id,
                                                         'code', 'attempts_exhausted'), now()))
                   AS v(event_type, payload, at)
)
SELECT id FROM failed
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
