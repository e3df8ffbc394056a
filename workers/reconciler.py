"""The reconciler: puts questions whose job was lost back on the queue.

PostgreSQL says which questions are unfinished; arq's keys in Redis say what
will run them, and each worker's heartbeat key whether it is alive
(``workers/liveness.py``). A ``running`` job whose row names a worker whose
heartbeat has expired is lost at once (the worker was killed), however recently
it published; so is one whose worker is alive but does not list it among the jobs
it runs (its task ended, e.g. with a Redis failover). Otherwise a job is lost
when its row is overdue (``queued`` longer
than ``RECONCILE_QUEUED_AFTER``, ``running`` longer than
``RECONCILE_RUNNING_AFTER``) and the queue holds nothing live for it:

- no arq job at all (Redis flushed or restarted empty; or arq finished it with
  an error outside the answer pipeline, a timeout or a database outage, and
  kept only its result): queued again under the same id, after clearing arq's
  leftovers (a kept result makes ``enqueue_job`` refuse the id for an hour);
- an arq job whose in-progress marker is older than ``RECONCILE_RUNNING_AFTER``
  (the worker running it was killed; arq itself would wait for the marker to
  expire, an hour after the pickup): the marker is removed, so the next free
  worker runs it at once.

A job in the queue with no marker is waiting for its turn, and one whose
marker or last event (a running answer publishes every few tokens) is younger
than ``RECONCILE_RUNNING_AFTER`` has a live worker: both are left alone. A
``running`` job that already started ``RECONCILE_MAX_ATTEMPTS`` times is failed
(``attempts_exhausted``) instead. Every worker schedules the run; arq's cron
ids make it one run per tick, and rows are claimed with ``SKIP LOCKED``, so
even overlapping runs handle each job once. A job run twice stores one answer
(``rag/answering/answers.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from arq.connections import ArqRedis
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from rag.answering.events import ERROR, EventLog
from rag.answering.jobs import StuckJob, claim_stuck, exhausted_error, fail_exhausted
from rag.answering.queue import stream_key, worker_key
from rag.platform import metrics
from rag.platform.resources import Resources
from workers.liveness import running_jobs

log = logging.getLogger("workers.reconciler")


@dataclass
class Report:
    """What one run did, by job id."""

    #: Lost from the queue, queued again.
    requeued: list[str] = field(default_factory=list)
    #: In the queue under a dead worker's marker: the marker removed, so it runs now.
    restarted: list[str] = field(default_factory=list)
    #: Started too often: marked failed.
    failed: list[str] = field(default_factory=list)
    #: Overdue but alive: waiting in the queue, or held by a live worker.
    waiting: list[str] = field(default_factory=list)

    @property
    def acted(self) -> bool:
        return bool(self.requeued or self.restarted or self.failed)


@dataclass(frozen=True)
class _Queued:
    """What arq holds for one job id."""

    in_queue: bool
    has_job: bool
    #: Milliseconds since a worker took it, or None with no in-progress marker.
    taken_ms: int | None
    #: Milliseconds since its last event, or None with no event stream.
    quiet_ms: int | None
    #: Whether the worker the row names still refreshes its heartbeat (None: no worker named).
    worker_alive: bool | None = None
    #: Whether that worker's heartbeat lists the job as running (None: it lists nothing).
    worker_runs_it: bool | None = None

    def alive(self, stale_ms: int) -> bool:
        """A worker took it, or it published, less than ``stale_ms`` ago."""
        return any(ms is not None and ms < stale_ms for ms in (self.taken_ms, self.quiet_ms))


async def reconcile(
    res: Resources,
    redis: ArqRedis,
    *,
    queue_name: str,
    function: str,
    in_progress_ttl: float,
) -> Report:
    """One pass over at most ``RECONCILE_BATCH`` overdue jobs.

    ``function`` is the arq function that answers a job (its only argument is the
    job id, which is also the arq job id); ``in_progress_ttl`` is the lifetime, in
    seconds, arq gives an in-progress marker (the longest job timeout plus 10 s),
    from which a marker's age is read.
    """
    settings = res.settings
    report = Report()
    jobs = await claim_stuck(
        res.db,
        queued_after=settings.reconcile_queued_after,
        running_after=settings.reconcile_running_after,
        dead_after=settings.worker_heartbeat_ttl,
        limit=settings.reconcile_batch,
    )
    if not jobs:
        return report
    states = await _inspect(redis, queue_name, jobs, in_progress_ttl)
    stale_ms = settings.reconcile_running_after * 1000
    exhausted: list[StuckJob] = []
    for job, queued in zip(jobs, states, strict=True):
        key = str(job.id)
        held = queued.in_queue and queued.has_job
        # Its worker is gone, or alive but no longer running it (its task ended with a
        # Redis failover): lost now, even if it published a moment ago.
        orphaned = job.status == "running" and (
            queued.worker_alive is False or queued.worker_runs_it is False
        )
        if held and queued.taken_ms is None:
            report.waiting.append(key)  # in the queue, waiting its turn
        elif not orphaned and ((queued.worker_alive and held) or queued.alive(stale_ms)):
            report.waiting.append(key)
        elif job.status == "running" and job.attempts >= settings.reconcile_max_attempts:
            exhausted.append(job)
        else:
            await _run_again(redis, queue_name, function, key, held, report)
    if exhausted:
        events = EventLog(res.redis)
        by_id = {job.id: job for job in exhausted}
        for job_id in await fail_exhausted(res.db, exhausted):
            key = str(job_id)
            await _clear(redis, queue_name, key)
            await events.publish(key, ERROR, exhausted_error(by_id[job_id].attempts))
            report.failed.append(key)
    metrics.RECONCILER_REQUEUES.inc(len(report.requeued) + len(report.restarted))
    metrics.RECONCILER_EXHAUSTED.inc(len(report.failed))
    for _ in report.failed:
        metrics.job_finished("failed", error="attempts_exhausted")
    if report.acted:
        log.warning(
            "reconciler: %d requeued, %d restarted, %d failed (%d overdue jobs still alive)",
            len(report.requeued),
            len(report.restarted),
            len(report.failed),
            len(report.waiting),
        )
    return report


async def _run_again(
    redis: ArqRedis, queue_name: str, function: str, key: str, held: bool, report: Report
) -> None:
    if held:
        # A dead worker's job, still queued under its marker: free it for the next worker.
        await redis.delete(in_progress_key_prefix + key)
        report.restarted.append(key)
        return
    await _clear(redis, queue_name, key)
    enqueued = await redis.enqueue_job(function, key, _job_id=key, _queue_name=queue_name)
    (report.requeued if enqueued is not None else report.waiting).append(key)


async def _inspect(
    redis: ArqRedis, queue_name: str, jobs: list[StuckJob], in_progress_ttl: float
) -> list[_Queued]:
    """arq's state, the last event and the worker's heartbeat of each job, in one
    round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for job in jobs:
            key = str(job.id)
            pipe.zscore(queue_name, key)
            pipe.exists(job_key_prefix + key)
            pipe.pttl(in_progress_key_prefix + key)
            pipe.xrevrange(stream_key(key), count=1)
            pipe.get(worker_key(job.worker or ""))
        now, *replies = await pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    ttl_ms = int(in_progress_ttl * 1000)
    states = []
    for i, job in enumerate(jobs):
        score, has_job, marker_ttl, last, beat = replies[5 * i : 5 * i + 5]
        # PTTL: -2 no marker; -1 a marker with no expiry, not arq's: treat it as fresh.
        taken_ms = None if marker_ttl == -2 else 0 if marker_ttl == -1 else ttl_ms - marker_ttl
        # Stream ids start with the Redis clock (ms) at the time of the XADD.
        quiet_ms = now_ms - int(last[0][0].split(b"-")[0]) if last else None
        alive = beat is not None if job.worker else None
        # A worker lists a job as it starts it (workers/liveness.py), and claimed
        # running jobs started at least a second ago (CLAIM_SQL).
        listed = running_jobs(beat) if job.worker else None
        runs_it = None if listed is None else str(job.id) in listed
        states.append(
            _Queued(score is not None, bool(has_job), taken_ms, quiet_ms, alive, runs_it)
        )
    return states


async def _clear(redis: ArqRedis, queue_name: str, key: str) -> None:
    """Remove every arq key of a job id, so it can be queued afresh (or never runs)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(queue_name, key)
        pipe.delete(
            job_key_prefix + key,
            in_progress_key_prefix + key,
            result_key_prefix + key,
            retry_key_prefix + key,
        )
        await pipe.execute()
