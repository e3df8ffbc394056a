"""The reconciler on a real PostgreSQL and Redis, with the real arq worker draining the queue."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from arq.connections import ArqRedis
from arq.worker import Worker

from rag.answering.events import EventLog
from rag.answering.jobs import ATTEMPTS_EXHAUSTED, CLAIM_SQL, create_job
from rag.answering.queue import QUEUE_NAME, worker_key
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.redis import create_pool
from rag.platform.resources import Resources, open_resources
from tests.fixtures.services import make_settings
from tests.fixtures.worker import drain_queue
from tests.rag.test_indexing import TOPICS, write_course
from tests.workers.test_cli import run_cli
from workers import reconciler
from workers.jobs import IN_PROGRESS_TTL, cron_jobs, reconcile_once
from workers.liveness import heartbeat

RUNNING_AFTER = 360


class Env:
    """The test's resources, its arq client, and helpers to stage lost jobs."""

    def __init__(self, res: Resources, queue: ArqRedis) -> None:
        self.res = res
        self.queue = queue

    async def job(
        self,
        *,
        status: str = "queued",
        attempts: int = 0,
        age: float = 3600,
        user: str = "alice",
        worker: str | None = None,
    ) -> str:
        """A job row last updated ``age`` seconds ago (started by ``worker``, if given);
        nothing is queued for it."""
        course_id = await self.res.db.fetch_value("SELECT id FROM courses")
        job = await create_job(
            self.res.db, user_id=user, course_id=course_id, question=f"What is gluten ({user})?"
        )
        await self.res.db.execute(
            "UPDATE assistant_jobs SET status = %s, attempts = %s, worker = %s,"
            " updated_at = now() - make_interval(secs => %s),"
            " started_at = CASE WHEN %s = 'running' THEN now() END WHERE id = %s",
            (status, attempts, worker, age, status, job.id),
        )
        return str(job.id)

    async def running_job(
        self,
        *,
        attempts: int,
        taken_ago: float,
        age: float = RUNNING_AFTER + 30,
        worker: str | None = None,
    ) -> str:
        """A ``running`` job (by default overdue for the reconciler), in arq's queue under
        a worker's in-progress marker set ``taken_ago`` seconds ago."""
        key = await self.job(status="running", attempts=attempts, age=age, worker=worker)
        await self.enqueue(key)
        await self.take(key, ago=taken_ago)
        return key

    async def enqueue(self, key: str) -> None:
        assert await self.queue.enqueue_job(
            "answer_question", key, _job_id=key, _queue_name=QUEUE_NAME
        )

    async def take(self, key: str, *, ago: float) -> None:
        """What a worker leaves when it takes the job (arq's in-progress marker) ``ago`` s ago."""
        ttl_ms = int(IN_PROGRESS_TTL * 1000) - int(ago * 1000)
        await self.queue.psetex(f"arq:in-progress:{key}", ttl_ms, b"1")

    async def reconcile(self) -> reconciler.Report:
        return await reconcile_once(self.res, self.queue)

    async def drain(self) -> None:
        await drain_queue(self.res, self.queue)

    async def row(self, key: str) -> Row:
        row = await self.res.db.fetch_one(
            Row,
            "SELECT status, attempts, answer, error,"
            " (SELECT count(*) FROM chat_messages m"
            "   WHERE m.job_id = j.id AND m.role = 'assistant') AS answers"
            " FROM assistant_jobs j WHERE id = %s",
            (uuid.UUID(key),),
        )
        assert row is not None
        return row

    async def arq_keys(self, key: str) -> list[str]:
        found = [
            name
            for name in ("job", "in-progress", "result", "retry")
            if await self.queue.exists(f"arq:{name}:{key}")
        ]
        if await self.queue.zscore(QUEUE_NAME, key) is not None:
            found.append("queue")
        return found


class Row(msgspec.Struct):
    status: str
    attempts: int
    answer: str | None
    error: Any
    answers: int


@pytest.fixture
async def env(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Env]:
    settings = make_settings(
        RECONCILE_QUEUED_AFTER="60",
        RECONCILE_RUNNING_AFTER=str(RUNNING_AFTER),
        RECONCILE_MAX_ATTEMPTS="3",
        RECONCILE_BATCH="100",
    )
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
        await reindex_course(res.db, res.embedding_cache(), settings, "test-course")
        queue = ArqRedis(create_pool(settings, redis_url))
        try:
            yield Env(res, queue)
        finally:
            await queue.aclose(close_connection_pool=True)


def _with_batch(env: Env, batch: int) -> Env:
    res = env.res
    settings = res.settings.replace(reconcile_batch=batch)
    return Env(Resources(settings, res.db, res.redis, res.provider, res.model_slots), env.queue)


# --- lost jobs come back


async def test_a_queued_job_redis_lost_is_queued_again_and_answered(env: Env) -> None:
    key = await env.job()
    report = await env.reconcile()
    assert report.requeued == [key] and not report.waiting
    assert await env.arq_keys(key) == ["job", "queue"]
    await env.drain()
    row = await env.row(key)
    assert row.status == "succeeded" and row.answers == 1


async def test_an_operator_can_run_a_pass_now_from_the_cli(
    env: Env, database_url: str, redis_url: str
) -> None:
    lost, alive = await env.job(), await env.job(user="bob")
    await env.enqueue(alive)  # waiting its turn in the queue: left alone
    done = await asyncio.to_thread(
        run_cli,
        "reconcile",
        database_url=database_url,
        redis_url=redis_url,
        RECONCILE_QUEUED_AFTER="60",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1 requeued, 0 restarted, 0 failed, 1 overdue but alive",
        f"  requeued {lost}",
    ]
    assert await env.arq_keys(lost) == ["job", "queue"]
    await env.drain()
    assert (await env.row(lost)).answers == 1


async def test_a_dead_workers_job_runs_again_at_once(env: Env) -> None:
    # Taken by a worker that was then killed: arq alone would wait an hour for its marker.
    key = await env.running_job(attempts=1, taken_ago=RUNNING_AFTER + 30)
    report = await env.reconcile()
    assert report.restarted == [key]
    assert await env.arq_keys(key) == ["job", "queue"]
    await env.drain()
    row = await env.row(key)
    assert row.status == "succeeded" and row.attempts == 2 and row.answers == 1
    events = await EventLog(env.res.redis).read(key)
    assert [e.type for e in events].count("reset") == 1 and events[-1].type == "done"


async def test_a_job_arq_finished_with_an_error_is_queued_again(env: Env) -> None:
    # E.g. the database was down when it ran: arq kept its result (which makes it refuse
    # the same id for an hour) and the row still says running.
    key = await env.job(status="running", attempts=1, age=RUNNING_AFTER + 30)
    await env.queue.psetex(f"arq:result:{key}", 3_600_000, b"failed")
    report = await env.reconcile()
    assert report.requeued == [key]
    assert await env.arq_keys(key) == ["job", "queue"]
    await env.drain()
    row = await env.row(key)
    assert row.status == "succeeded" and row.answers == 1


async def test_an_answered_job_run_again_stores_nothing_twice(env: Env) -> None:
    key = await env.job()
    await env.reconcile()
    await env.drain()
    # An hour later (its events expired) its row is made to look lost again: the
    # rerun finds the answer and stops.
    await env.res.db.execute(
        "UPDATE assistant_jobs SET status = 'running', updated_at = now() - interval '1 hour'"
        " WHERE id = %s",
        (uuid.UUID(key),),
    )
    await env.queue.delete(f"job:{key}:events")
    assert (await env.reconcile()).requeued == [key]
    await env.drain()
    row = await env.row(key)
    assert row.status == "succeeded" and row.answers == 1 and row.attempts == 1


# --- what is alive is left alone


async def test_a_job_waiting_its_turn_is_left_alone(env: Env) -> None:
    key = await env.job()
    await env.enqueue(key)
    score = await env.queue.zscore(QUEUE_NAME, key)
    report = await env.reconcile()
    assert report.waiting == [key] and not report.acted
    assert await env.queue.zscore(QUEUE_NAME, key) == score


async def test_a_job_a_live_worker_holds_is_left_alone(env: Env) -> None:
    key = await env.running_job(attempts=1, taken_ago=5)  # a worker took it again 5 s ago
    report = await env.reconcile()
    assert report.waiting == [key] and not report.acted
    assert await env.arq_keys(key) == ["job", "in-progress", "queue"]


async def test_recent_and_finished_jobs_are_not_looked_at(env: Env) -> None:
    await env.job(age=10)  # queued 10 s ago: not overdue
    await env.job(status="running", attempts=1, age=RUNNING_AFTER - 30, user="bob")
    for status in ("succeeded", "failed", "cancelled"):
        await env.job(status=status, user=status)
    report = await env.reconcile()
    assert report == reconciler.Report()


# --- giving up


async def test_a_job_started_too_often_is_failed_not_run_again(env: Env) -> None:
    key = await env.running_job(attempts=3, taken_ago=RUNNING_AFTER + 30)
    report = await env.reconcile()
    assert report.failed == [key]
    row = await env.row(key)
    assert row.status == "failed" and row.answers == 0
    assert row.error["code"] == ATTEMPTS_EXHAUSTED and row.error["retryable"] is False
    assert "3 times" in row.error["message"]
    assert await env.arq_keys(key) == []
    events = await EventLog(env.res.redis).read(key)
    assert events[-1].type == "error" and events[-1].data == row.error
    assert (await env.reconcile()) == reconciler.Report()
    # The activity record has the question and its failure, once (rag/learners/activity.py).
    recorded = await env.res.db.fetch_value(
        "SELECT array_agg(event_type || ':' || coalesce(payload ->> 'code', '') ORDER BY id)"
        " FROM learner_activity_events WHERE payload ->> 'job_id' = %s",
        (key,),
    )
    assert recorded == ["asked:", f"failed:{ATTEMPTS_EXHAUSTED}"]


async def test_a_job_below_the_limit_runs_again(env: Env) -> None:
    key = await env.job(status="running", attempts=2, age=RUNNING_AFTER + 30)
    assert (await env.reconcile()).requeued == [key]


# --- bounded, and safe to run concurrently


async def test_a_run_looks_at_a_bounded_batch(env: Env) -> None:
    keys = {await env.job(user=f"u{i}") for i in range(5)}
    small = _with_batch(env, 2)
    seen: list[str] = []
    for expected in (2, 2, 1, 0):
        report = await small.reconcile()
        assert len(report.requeued) == expected
        seen += report.requeued
    assert set(seen) == keys and len(seen) == 5


async def test_concurrent_runs_handle_each_job_once(env: Env) -> None:
    keys = {await env.job(user=f"u{i}") for i in range(10)}
    await env.job(status="running", attempts=1, age=RUNNING_AFTER + 30, user="r")
    reports = await asyncio.gather(*(env.reconcile() for _ in range(4)))
    requeued = [key for report in reports for key in report.requeued]
    assert len(requeued) == len(set(requeued)) == 11
    assert keys < set(requeued)
    assert await env.queue.zcard(QUEUE_NAME) == 11


async def test_the_claim_uses_the_stuck_jobs_index(env: Env) -> None:
    async with env.res.db.transaction() as conn:
        # Tiny tables make a sequential scan look cheapest; what matters is that an
        # index serves both scans once the table is large.
        await conn.execute("SET LOCAL enable_seqscan = off")
        cur = await conn.execute(
            "EXPLAIN " + CLAIM_SQL,
            {"queued_after": 60, "running_after": 360, "dead_after": 15, "limit": 100},
        )
        plan = "\n".join(str(row[0]) for row in await cur.fetchall())
    assert plan.count("Index Scan using assistant_jobs_stuck_idx") == 2, plan
    assert "Sort" not in plan, plan


# --- the schedule


def test_the_cron_runs_every_interval_and_at_start_up() -> None:
    job, insights = cron_jobs(make_settings(RECONCILE_INTERVAL="5"))
    assert job.name == "reconcile" and job.unique and job.run_at_startup
    assert job.second == set(range(0, 60, 5)) and job.minute is None
    job, _ = cron_jobs(make_settings(RECONCILE_INTERVAL="120"))
    assert job.second == 0 and job.minute == set(range(0, 60, 2))
    # The staff's insight summaries: every INSIGHTS_REFRESH_INTERVAL (300 s), and at start.
    assert insights.name == "refresh_insights" and insights.unique and insights.run_at_startup
    assert insights.second == 0 and insights.minute == set(range(0, 60, 5))
    _, hourly = cron_jobs(make_settings(INSIGHTS_REFRESH_INTERVAL="7200"))
    assert hourly.minute == 0 and hourly.hour == set(range(0, 24, 2))


async def test_many_workers_queue_one_reconciler_run_per_tick(env: Env) -> None:
    settings = make_settings(RECONCILE_INTERVAL="10")
    workers = [
        Worker(
            [],
            cron_jobs=cron_jobs(settings),  # each its own schedule, as in separate processes
            redis_pool=env.queue,
            queue_name=QUEUE_NAME,
            handle_signals=False,
        )
        for _ in range(3)
    ]
    jobs = [job for w in workers for job in w.cron_jobs if job.name == "reconcile"]
    now = datetime.now(tz=workers[0].timezone)
    for worker in workers:  # start-up runs (here at the same instant: one id each)
        await worker.run_cron(now, 0.5)
    started = sorted(k.decode().split(":")[0] for k in await env.queue.zrange(QUEUE_NAME, 0, -1))
    assert started == ["reconcile", "refresh_insights"]
    tick = jobs[0].next_run
    assert tick is not None and all(job.next_run == tick for job in jobs)
    # This tick may also be one of the insight summaries' (every five minutes, on the
    # minute), which rightly queues one more of those: once, however many workers.
    insights = next(job for job in workers[0].cron_jobs if job.name == "refresh_insights")
    assert insights.next_run is not None
    insights_due = insights.next_run <= tick
    for worker in workers:  # the next tick, seen by each worker's heartbeat
        await worker.run_cron(tick - timedelta(seconds=0.5), 0.5)
    names = sorted(k.decode().split(":")[0] for k in await env.queue.zrange(QUEUE_NAME, 0, -1))
    assert names == ["reconcile", "reconcile"] + ["refresh_insights"] * (2 if insights_due else 1)


async def test_a_job_still_publishing_is_left_alone_whatever_its_marker_says(env: Env) -> None:
    # A live answer longer than RECONCILE_RUNNING_AFTER: its tokens show it is alive.
    key = await env.running_job(attempts=3, taken_ago=RUNNING_AFTER + 30)
    await EventLog(env.res.redis).publish(key, "token", {"text": "still here"})
    report = await env.reconcile()
    assert report.waiting == [key] and not report.acted
    assert (await env.row(key)).status == "running"


# --- a worker's own liveness decides, not the job's age


async def test_a_killed_workers_job_runs_again_once_its_heartbeat_expires(env: Env) -> None:
    """Killed mid-answer 20 s ago: its last token is fresh and its row far younger than
    RECONCILE_RUNNING_AFTER, which is what made recovery take two deadlines. Its
    heartbeat key is gone, and that is enough."""
    key = await env.running_job(attempts=1, taken_ago=20, age=20, worker="host:1:dead")
    await EventLog(env.res.redis).publish(key, "token", {"text": "cut off"})
    report = await env.reconcile()
    assert report.restarted == [key]
    await env.drain()
    row = await env.row(key)
    assert row.status == "succeeded" and row.attempts == 2 and row.answers == 1


async def test_a_live_workers_job_is_left_alone_however_old(env: Env) -> None:
    running: set[str] = set()
    async with heartbeat(env.res.redis, "host:2:alive", 15, lambda: running):
        key = await env.running_job(
            attempts=1, taken_ago=RUNNING_AFTER + 30, age=RUNNING_AFTER + 30, worker="host:2:alive"
        )
        running.add(key)
        await env.res.redis.set(worker_key("host:2:alive"), f"jobs:{key}".encode(), ex=15)
        report = await env.reconcile()
        assert report.waiting == [key] and not report.acted
        assert await env.arq_keys(key) == ["job", "in-progress", "queue"]
    # Stopped (its key deleted on the way out): the job is run again on the next pass.
    await env.res.db.execute(
        "UPDATE assistant_jobs SET updated_at = now() - interval '1 minute' WHERE id = %s",
        (uuid.UUID(key),),
    )
    assert (await env.reconcile()).restarted == [key]


async def test_a_live_worker_that_no_longer_runs_a_job_gives_it_up_at_once(env: Env) -> None:
    """After a Redis failover the new primary still holds arq's in-progress marker of a
    job whose task ended with the connection error; the worker is alive and does not
    list the job: run again now, not when the marker expires five minutes later."""
    other = "00000000-0000-0000-0000-000000000001"
    async with heartbeat(env.res.redis, "host:5:alive", 15, lambda: {other}):
        key = await env.running_job(attempts=1, taken_ago=20, age=20, worker="host:5:alive")
        await EventLog(env.res.redis).publish(key, "token", {"text": "cut off"})
        report = await env.reconcile()
        assert report.restarted == [key]
    # An older worker's plain heartbeat says nothing about its jobs: left alone.
    await env.res.redis.set(worker_key("host:6:old"), b"1", ex=15)
    old = await env.running_job(attempts=1, taken_ago=20, age=20, worker="host:6:old")
    report = await env.reconcile()
    assert report.waiting == [old] and not report.acted


async def test_a_job_younger_than_the_heartbeat_is_not_looked_at(env: Env) -> None:
    await env.running_job(attempts=1, taken_ago=5, age=5, worker="host:3:dead")
    assert await env.reconcile() == reconciler.Report()


async def test_the_heartbeat_is_refreshed_and_deleted_on_exit(env: Env) -> None:
    redis = env.res.redis
    running = {"b-job", "a-job"}
    async with heartbeat(redis, "host:4:beat", 3, lambda: running):
        assert 0 < await redis.ttl(worker_key("host:4:beat")) <= 3
        assert await redis.get(worker_key("host:4:beat")) == b"jobs:a-job,b-job"
        running.discard("a-job")
        await asyncio.sleep(1.3)  # past one refresh (every ttl / 3)
        assert await redis.pttl(worker_key("host:4:beat")) > 2500
        assert await redis.get(worker_key("host:4:beat")) == b"jobs:b-job"
    assert not await redis.exists(worker_key("host:4:beat"))
