"""Worker liveness: a heartbeat key each worker process refreshes while it runs.

A job row says which worker runs it (``assistant_jobs.worker``, written when the
answer starts); the reconciler checks that worker's key. A process killed with
``SIGKILL``, or on a machine that vanished, stops refreshing it, and the key
expires ``WORKER_HEARTBEAT_TTL`` seconds after its last refresh: its running
jobs are then run again on the reconciler's next pass, however recently they
published. Before, a dead worker was inferred from the age of the job's last
event, which a job killed mid-answer had just refreshed, so recovery took up to
two ``RECONCILE_RUNNING_AFTER`` periods (about 12 minutes at the defaults).

Why not arq's in-progress key: arq sets it once per job with the job's whole
timeout (five minutes here) and never refreshes it, so its expiry says nothing
about the worker until long after it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator

import redis.exceptions

from rag.answering.queue import worker_key
from rag.platform.redis import Redis

log = logging.getLogger("workers.liveness")


def new_worker_id() -> str:
    """Unique per process start; host and pid first, for operators reading keys."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def heartbeat(client: Redis, worker_id: str, ttl: int) -> AsyncIterator[None]:
    """Keep ``worker_key(worker_id)`` alive for as long as the block runs.

    Refreshed every ``ttl / 3`` seconds, so two refreshes may fail (a Redis blip)
    before the key expires. On a clean exit the key is deleted: the worker's
    running jobs were finished or given back to the queue by arq by then.
    """
    key = worker_key(worker_id)

    async def refresh() -> None:
        try:
            await client.set(key, b"1", ex=ttl)
        except redis.exceptions.RedisError as exc:
            log.warning("worker heartbeat not refreshed: %s", exc)

    async def beat() -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            await refresh()

    await refresh()  # before the first job can start
    task = asyncio.create_task(beat(), name="worker-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(redis.exceptions.RedisError):
            await client.delete(key)
