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

The key's value lists the jobs the worker is running (``jobs:<id>,<id>``), so a
live worker that lost a job also says so: after a Redis failover the new primary
may still hold arq's in-progress marker of a job whose task already ended with the
connection error, and without the list that job would wait for the marker to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Collection

import redis.exceptions

from rag.answering.queue import worker_key
from rag.platform.redis import Redis

log = logging.getLogger("workers.liveness")


def new_worker_id() -> str:
    """Unique per process start; host and pid first, for operators reading keys."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


#: What a heartbeat's value starts with; the ids of the jobs it runs follow.
RUNNING_PREFIX = b"jobs:"


def running_jobs(value: bytes | None) -> set[str] | None:
    """The job ids a heartbeat value lists; None when it lists none (no key, or an
    older worker's plain ``1``, which says nothing about its jobs)."""
    if value is None or not value.startswith(RUNNING_PREFIX):
        return None
    listed = value[len(RUNNING_PREFIX) :].decode()
    return set(listed.split(",")) if listed else set()


class Heartbeat:
    """A running heartbeat; :meth:`poke` writes it again now (a job just started)."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def poke(self) -> None:
        self._changed.set()

    async def wait(self, seconds: float) -> None:
        """Until poked or ``seconds`` passed; pokes that came meanwhile count as one."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
        self._changed.clear()


@contextlib.asynccontextmanager
async def heartbeat(
    client: Redis,
    worker_id: str,
    ttl: int,
    running: Callable[[], Collection[str]] = frozenset,
) -> AsyncIterator[Heartbeat]:
    """Keep ``worker_key(worker_id)`` alive for as long as the block runs, holding
    the ids ``running()`` returns.

    Refreshed every ``ttl / 3`` seconds, so two refreshes may fail (a Redis blip)
    before the key expires, and at once when poked: a job that starts is listed
    within a round trip, before the reconciler could look at it (it looks at
    running rows a second old at the soonest). Pokes in a burst make one write. On
    a clean exit the key is deleted: the worker's running jobs were finished or
    given back to the queue by arq by then.
    """
    key = worker_key(worker_id)
    beat = Heartbeat()

    async def refresh() -> None:
        value = RUNNING_PREFIX + ",".join(sorted(running())).encode()
        try:
            await client.set(key, value, ex=ttl)
        except redis.exceptions.RedisError as exc:
            log.warning("worker heartbeat not refreshed: %s", exc)

    async def beating() -> None:
        while True:
            await beat.wait(ttl / 3)
            await refresh()

    await refresh()  # before the first job can start
    task = asyncio.create_task(beating(), name="worker-heartbeat")
    try:
        yield beat
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(redis.exceptions.RedisError):
            await client.delete(key)
