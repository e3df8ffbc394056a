"""The arq worker's poll loop (workers/jobs.py, ReconnectingWorker) on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from rag.answering.queue import QUEUE_NAME
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
