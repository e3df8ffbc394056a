"""arq job functions and the worker that runs them.

Jobs are thin: they take the process's clients from ``ctx`` and call ``rag``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import prometheus_client
import redis.exceptions
from arq.connections import ArqRedis
from arq.cron import CronJob, cron
from arq.worker import Worker, func

from rag.answering import answers
from rag.answering.events import EventLog
from rag.answering.queue import (
    ANSWER_QUESTION,
    QUEUE_NAME,
    REINDEX_COURSE,
    UPDATE_CHAT_SUMMARY,
    WAKE_KEY,
)
from rag.answering.summaries import summary_job_id, update_summary
from rag.content.indexing import ReindexReport
from rag.content.indexing import reindex_course as reindex_one
from rag.learners.insights import WEAK_MARGIN, refresh_stale
from rag.platform import tracing
from rag.platform.logs import logged_job
from rag.platform.redis import create_pool
from rag.platform.resources import Resources, open_resources
from rag.platform.settings import Settings
from workers import reconciler
from workers.liveness import heartbeat, new_worker_id

log = logging.getLogger("workers.jobs")


async def reindex_course(
    ctx: dict[str, Any], course_key: str, full: bool = False
) -> dict[str, Any]:
    """The ``reindex`` CLI command as a job: operators can queue it from anywhere."""
    res: Resources = ctx["res"]
    report = await reindex_one(res.db, res.embedding_cache(), res.settings, course_key, full=full)
    log.info("reindexed %s: %s", course_key, report_summary(report))
    return report_summary(report)


def report_summary(report: ReindexReport) -> dict[str, Any]:
    return {
        "courses": report.courses,
        "topics": report.topics,
        "topics_changed": report.topics_changed,
        "chunks_added": report.chunks_added,
        "chunks_kept": report.chunks_kept,
        "chunks_deleted": report.chunks_deleted,
        "provider_calls": report.provider_calls,
        "cache_hits": report.cache_hits,
        "content_versions": report.versions,
        "seconds": round(report.seconds, 3),
    }


async def answer_question(
    ctx: dict[str, Any],
    job_id: str,
    request_id: str | None = None,
    trace: dict[str, str] | None = None,
) -> str:
    """Answer one queued question (at-least-once delivery, exactly-once effects);
    after its ``done`` event, queue the session's summary update if one is due.

    ``request_id`` is the asking request's (the reconciler's reruns have none): every
    line logged while the job runs carries it and the job id. ``trace`` is the
    asking request's trace context: the job's spans continue that trace."""
    res: Resources = ctx["res"]
    running: set[str] = ctx.setdefault("running", set())  # the heartbeat lists them
    running.add(job_id)
    if (beat := ctx.get("heartbeat")) is not None:
        beat.poke()
    try:
        with (
            logged_job(job_id, request_id),
            tracing.continued(trace, "answer_question", {"job.id": job_id}),
        ):
            status = await answers.answer_question(
                res, ctx["events"], uuid.UUID(job_id), worker=ctx.get("worker_id")
            )
            log.info("question %s", status, extra={"status": status})
            if status == "succeeded":
                await _maybe_enqueue_summary(ctx, uuid.UUID(job_id))
    finally:
        running.discard(job_id)
    return status


async def _maybe_enqueue_summary(ctx: dict[str, Any], job_id: uuid.UUID) -> None:
    res: Resources = ctx["res"]
    every = res.settings.summary_every_messages
    row = await res.db.fetch_one(
        _SummaryState,
        "SELECT s.id AS session_id, s.message_count, s.summary_message_count"
        " FROM assistant_jobs j JOIN chat_sessions s ON s.id = j.session_id WHERE j.id = %s",
        (job_id,),
    )
    if row is not None and row.message_count - row.summary_message_count >= every:
        # The id names the step, so concurrent answers enqueue it once.
        await ctx["redis"].enqueue_job(
            UPDATE_CHAT_SUMMARY,
            str(row.session_id),
            _job_id=summary_job_id(row.session_id, row.message_count, every),
        )


class _SummaryState(msgspec.Struct):
    session_id: uuid.UUID
    message_count: int
    summary_message_count: int


async def update_chat_summary(ctx: dict[str, Any], session_id: str) -> bool:
    """Fold a session's new messages into its running summary."""
    return await update_summary(ctx["res"], uuid.UUID(session_id))


#: arq's limit on one answer; RECONCILE_RUNNING_AFTER should exceed it, so that a job
#: the reconciler finds overdue cannot still be running.
ANSWER_TIMEOUT = 300
RECONCILE_TIMEOUT = 60

FUNCTIONS = [
    func(answer_question, name=ANSWER_QUESTION, timeout=ANSWER_TIMEOUT, max_tries=3),
    func(update_chat_summary, name=UPDATE_CHAT_SUMMARY, timeout=120, max_tries=3),
    # Reindexing a large course can take minutes; it is idempotent, so a retry is safe.
    func(reindex_course, name=REINDEX_COURSE, timeout=3600, max_tries=3),
]

#: How long arq keeps a job's in-progress marker: its longest job timeout plus 10 s
#: (arq.worker.Worker.in_progress_timeout_s). The reconciler reads a marker's age from it.
IN_PROGRESS_TTL = max([f.timeout_s or 0 for f in FUNCTIONS] + [RECONCILE_TIMEOUT]) + 10


#: Seconds one refresh of the insight summaries may take (every stale course).
INSIGHTS_TIMEOUT = 600


async def reconcile_once(res: Resources, redis: ArqRedis) -> reconciler.Report:
    """One reconciler pass over this service's queue (the cron job's, and the CLI's)."""
    return await reconciler.reconcile(
        res,
        redis,
        queue_name=QUEUE_NAME,
        function=ANSWER_QUESTION,
        in_progress_ttl=IN_PROGRESS_TTL,
    )


async def reconcile(ctx: dict[str, Any]) -> dict[str, int]:
    """The periodic reconciler (``workers/reconciler.py``): lost questions back on the queue."""
    report = await reconcile_once(ctx["res"], ctx["redis"])
    return {
        "requeued": len(report.requeued),
        "restarted": len(report.restarted),
        "failed": len(report.failed),
        "waiting": len(report.waiting),
    }


async def refresh_insights(ctx: dict[str, Any]) -> dict[str, int]:
    """The staff's insight summaries, for the courses with new activity
    (``rag/learners/insights.py``)."""
    res: Resources = ctx["res"]
    below = min(1.0, res.settings.relevance_floor + WEAK_MARGIN)
    refreshed = await refresh_stale(res.db, below=below)
    return {"courses": len(refreshed)}


def _every(period: int) -> dict[str, Any]:
    """An arq cron schedule that fires every ``period`` seconds (rounded to what a
    minute or an hour divides)."""
    if period < 60:
        return {"second": set(range(0, 60, period))}
    if period < 3600:
        return {"second": 0, "minute": set(range(0, 60, max(1, period // 60)))}
    return {"second": 0, "minute": 0, "hour": set(range(0, 24, max(1, period // 3600)))}


def cron_jobs(settings: Settings) -> list[CronJob]:
    """The reconciler every ``RECONCILE_INTERVAL`` seconds and the insight summaries
    every ``INSIGHTS_REFRESH_INTERVAL``, each also once at start-up.

    Each worker schedules them; a tick's job id is the tick's time (arq's ``unique``),
    so however many workers run, one of them runs each tick.
    """
    return [
        cron(
            reconcile,
            name="reconcile",
            run_at_startup=True,
            unique=True,
            timeout=RECONCILE_TIMEOUT,
            max_tries=1,
            **_every(settings.reconcile_interval),
        ),
        cron(
            refresh_insights,
            name="refresh_insights",
            run_at_startup=True,
            unique=True,
            timeout=INSIGHTS_TIMEOUT,
            max_tries=1,
            **_every(settings.insights_refresh_interval),
        ),
    ]


def job_context(res: Resources, *, worker_id: str | None = None) -> dict[str, Any]:
    """The ``ctx`` every job reads its clients from (arq adds ``redis`` itself);
    ``worker_id`` names the process's heartbeat (``workers/liveness.py``), which lists
    the ``running`` answers."""
    return {"res": res, "events": EventLog(res.redis), "worker_id": worker_id, "running": set()}


#: What a Redis outage looks like from arq's poll loop: redis-py turns a connection
#: lost under ``WATCH`` (arq's enqueue, e.g. of a cron job) into a WatchError.
_REDIS_OUTAGE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.WatchError,
)


class ReconnectingWorker(Worker):
    """An arq worker that rides out a Redis outage instead of exiting.

    arq's poll loop lets a connection error escape ``main``, which ends the
    process; a supervisor would restart it, but ``make dev`` and small
    deployments have none that does. Overriding ``_poll_iteration`` (arq 0.26 to
    0.28) keeps the loop: the failed poll is logged once per outage and retried
    every second. Jobs that were running fail on their own Redis calls; their
    rows stay ``queued``/``running`` and the reconciler runs them again.

    A poll that starts nothing, with room for more, is followed by a wait on the
    queue's wake-up list (``BLPOP``, at most :attr:`idle_wait`), which the API
    pushes to after each question it enqueues: an idle worker makes about four
    polls a second instead of arq's one per ``poll_delay`` (10 ms here), and a
    question starts one round trip after it is enqueued instead of up to one
    ``poll_delay`` later. A poll that started jobs, or a worker that is full,
    polls again after ``poll_delay`` as before.
    """

    #: How long an idle worker waits for a wake-up before polling anyway: the
    #: latest that a job enqueued without one starts (a deferred retry, a
    #: reconciler's requeue, a summary step, a reindex).
    idle_wait = 0.25
    _redis_lost = False
    _started = 0

    async def _poll_iteration(self) -> None:
        self._started = 0
        try:
            await super()._poll_iteration()
            if (
                not self._started
                and not self.burst
                and self.allow_pick_jobs
                and self.job_counter < self.max_jobs
            ):
                # execute_command: redis-py types blpop's timeout as whole seconds.
                wait = self.pool.execute_command
                await wait("BLPOP", WAKE_KEY, self.idle_wait)  # type: ignore[no-untyped-call]
        except _REDIS_OUTAGE as exc:
            if not self._redis_lost:
                log.warning("Redis unreachable (%s); the worker retries every second", exc)
            self._redis_lost = True
            await asyncio.sleep(1)
            return
        if self._redis_lost:
            log.warning("Redis is back; the worker takes jobs again")
            self._redis_lost = False

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the queued jobs, passing over the ones this worker already runs.

        arq leaves a job in the queue's sorted set until it finishes, and each poll
        (every ``poll_delay``) checks every id it reads with WATCH, EXISTS, ZSCORE
        and UNWATCH before finding it in progress: with 50 answers streaming, that
        was about 110 Redis commands per question (``bench.service``, benchmark 4,
        ``store_work_per_question``) and a large share of the worker's and Redis's
        CPU. A job whose task here is still running is in progress by definition
        (arq set its marker when it started it), so skipping it changes nothing
        arq would decide, except that an expired marker can no longer make this
        worker start a second copy of a job it is running.
        """
        running = self.tasks
        before = len(running)
        await super().start_jobs(
            [j for j in job_ids if (t := running.get(j.decode())) is None or t.done()]
        )
        self._started += len(running) - before


class QuietReconcilerPasses(logging.Filter):
    """arq logs every job's start and end at INFO, so the reconciler's pass filled the
    log with two lines every ``RECONCILE_INTERVAL``. Those lines are dropped unless
    the log level is DEBUG; a pass that acts says so itself, at WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        # The job's reference: its name, after its id when it has one.
        return not any(
            isinstance(a, str) and (a == "reconcile" or a.endswith(":reconcile")) for a in args
        )


async def run_worker(settings: Settings, *, database_url: str, redis_url: str) -> None:
    """Run one worker process until it is signalled to stop."""
    logging.getLogger("arq.worker").addFilter(QuietReconcilerPasses())
    # One Redis pool for the process: arq's queue client is also the caches' client.
    redis = ArqRedis(create_pool(settings, redis_url))
    if settings.reconcile_running_after <= ANSWER_TIMEOUT:
        log.warning(
            "RECONCILE_RUNNING_AFTER=%d is not above the answer timeout (%d s): a slow "
            "answer whose worker is alive may be started a second time",
            settings.reconcile_running_after,
            ANSWER_TIMEOUT,
        )
    worker_id = new_worker_id()
    with _metrics_server(settings):
        await _run(settings, redis, worker_id, database_url)


@contextlib.contextmanager
def _metrics_server(settings: Settings) -> Iterator[None]:
    """prometheus-client's own HTTP server on ``WORKER_METRICS_PORT``, in a daemon
    thread: it reads the registry the job tasks update, so it never holds up the
    event loop. Nothing when the port is 0."""
    if not settings.worker_metrics_port:
        yield
        return
    server, thread = prometheus_client.start_http_server(
        settings.worker_metrics_port, addr=settings.worker_metrics_host
    )
    log.info(
        "worker metrics on http://%s:%d/metrics",
        settings.worker_metrics_host,
        settings.worker_metrics_port,
    )
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def _run(settings: Settings, redis: ArqRedis, worker_id: str, database_url: str) -> None:
    async with open_resources(settings, database_url=database_url, redis=redis) as res:
        ctx = job_context(res, worker_id=worker_id)
        async with heartbeat(
            res.redis, worker_id, settings.worker_heartbeat_ttl, lambda: ctx["running"]
        ) as beat:
            ctx["heartbeat"] = beat
            await _work(settings, redis, ctx)


async def _work(settings: Settings, redis: ArqRedis, ctx: dict[str, Any]) -> None:
    """Run the arq worker over ``ctx`` until it is signalled to stop."""
    worker = ReconnectingWorker(
        FUNCTIONS,
        cron_jobs=cron_jobs(settings),
        redis_pool=redis,
        queue_name=QUEUE_NAME,
        ctx=ctx,
        max_jobs=settings.worker_concurrency,
        # Between polls that start jobs. An idle worker waits on the wake-up
        # list instead (ReconnectingWorker.idle_wait); arq alone would poll every
        # poll_delay, ~100 ZRANGEBYSCORE calls a second, about 5% of a core.
        poll_delay=0.01,
        handle_signals=True,
        # On SIGTERM/SIGINT arq stops taking jobs, waits this long for the
        # running ones, then cancels the rest, which (retry_jobs) go back on
        # the queue; a rerun starts over cleanly (see rag.answering.answers).
        job_completion_wait=settings.worker_shutdown_grace,
        keep_result=3600,
    )
    try:
        # async_run, not main: arq's SIGTERM/SIGINT handler stops the worker by
        # cancelling the task that async_run records.
        await worker.async_run()
    except asyncio.CancelledError:
        log.info("worker stopped")
    finally:
        await worker.close()
