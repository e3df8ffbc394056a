"""The arq worker's poll loop (workers/jobs.py, ReconnectingWorker) on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import func

from rag.answering.queue import QUEUE_NAME, WAKE_KEY, WAKE_TOKENS, wake_workers
from rag.platform.redis import create_pool
from tests.fixtures.services import make_settings
from workers.jobs import FUNCTIONS, ReconnectingWorker


async def test_a_poll_passes_over_the_jobs_the_worker_runs(redis_url: str) -> None:
    """arq keeps a running job in the queue until it ends; each poll would check it
    again (four Redis commands) and, were its in-progress marker gone, start it a
    second time. The worker skips the jobs its own tasks are running."""
    redis = ArqRedis(create_pool(make_settings(), redis_url))
    worker = ReconnectingWorker(
        FUNCTIONS, redis_pool=redis, queue_name=QUEUE_NAME, handle_signals=False, burst=True
    )
    running = asyncio.get_running_loop().create_future()
    try:
        await redis.zadd(QUEUE_NAME, {"job-running-here": 1, "job-new": 1})
        worker.tasks["job-running-here"] = running  # type: ignore[assignment]
        await worker.start_jobs([b"job-running-here", b"job-new"])
        # Its marker is missing, yet it was not started again: no marker, same task.
        assert not await redis.exists(in_progress_key_prefix + "job-running-here")
        assert worker.tasks["job-running-here"] is running
        # Queued jobs it does not run are started as arq starts them.
        assert await redis.exists(in_progress_key_prefix + "job-new")
        assert "job-new" in worker.tasks
    finally:
        running.cancel()
        for task in worker.tasks.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await redis.delete(QUEUE_NAME, in_progress_key_prefix + "job-new")
        await redis.aclose(close_connection_pool=True)


class _CountingWorker(ReconnectingWorker):
    polls = 0

    async def _poll_iteration(self) -> None:
        self.polls += 1
        await super()._poll_iteration()


@contextlib.asynccontextmanager
async def _running_worker(
    redis_url: str, idle_wait: float
) -> AsyncIterator[tuple[_CountingWorker, ArqRedis, asyncio.Queue[str]]]:
    """A worker (not burst) with one job function, ``probe``, that reports its
    argument; running until the block ends, on an empty queue and wake-up list."""
    redis = ArqRedis(create_pool(make_settings(), redis_url))
    await redis.delete(QUEUE_NAME, WAKE_KEY)
    started: asyncio.Queue[str] = asyncio.Queue()

    async def probe(ctx: dict[str, Any], name: str) -> None:
        started.put_nowait(name)

    worker = _CountingWorker(
        [func(probe, name="probe")],
        redis_pool=redis,
        queue_name=QUEUE_NAME,
        handle_signals=False,
        poll_delay=0.01,
        keep_result=0,
    )
    worker.idle_wait = idle_wait
    task = asyncio.create_task(worker.main())
    try:
        yield worker, redis, started
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await redis.delete(QUEUE_NAME, WAKE_KEY)
        await redis.aclose(close_connection_pool=True)


async def _tokens(redis: ArqRedis) -> int:
    # redis-py types llen for both its clients (Awaitable[int] | int).
    return await cast("Awaitable[int]", redis.llen(WAKE_KEY))


async def test_an_idle_worker_waits_for_a_wake_up_instead_of_polling(redis_url: str) -> None:
    """arq alone polls every poll_delay (10 ms: about 100 polls a second). An idle
    worker blocks on the wake-up list between polls, and a pushed token (what the
    API sends after each question) starts a job at once, long before the idle wait
    would have ended."""
    async with _running_worker(redis_url, idle_wait=30) as (worker, redis, started):
        await asyncio.sleep(1)
        assert worker.polls <= 3  # the first, maybe a second: not ~100
        await redis.enqueue_job("probe", "woken", _queue_name=QUEUE_NAME)
        await wake_workers(redis)
        assert await asyncio.wait_for(started.get(), timeout=10) == "woken"


async def test_a_job_enqueued_without_a_wake_up_starts_after_the_idle_wait(
    redis_url: str,
) -> None:
    """Not every enqueue wakes (a reconciler's requeue, a summary step, a deferred
    retry): the idle wait bounds how long such a job waits."""
    async with _running_worker(redis_url, idle_wait=0.2) as (_, redis, started):
        await asyncio.sleep(0.3)
        await redis.enqueue_job("probe", "unannounced", _queue_name=QUEUE_NAME)
        assert await asyncio.wait_for(started.get(), timeout=10) == "unannounced"
        assert await _tokens(redis) == 0


async def test_wake_up_tokens_are_bounded(redis_url: str) -> None:
    """With no worker up, the tokens of many questions do not pile up."""
    redis = ArqRedis(create_pool(make_settings(), redis_url))
    try:
        await redis.delete(WAKE_KEY)
        for _ in range(WAKE_TOKENS + 10):
            await wake_workers(redis)
        assert await _tokens(redis) == WAKE_TOKENS
    finally:
        await redis.delete(WAKE_KEY)
        await redis.aclose(close_connection_pool=True)
