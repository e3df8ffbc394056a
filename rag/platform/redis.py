"""The Redis client: one bounded connection pool per process, errors translated."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import redis.exceptions

from rag.platform.errors import Busy, RedisUnavailable
from rag.platform.settings import Settings

Redis = aioredis.Redis


def as_text(value: object) -> str:
    """A reply as ``str``: the project's clients return bytes (``decode_responses`` off)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def create_pool(
    settings: Settings, url: str, *, max_connections: int | None = None
) -> aioredis.BlockingConnectionPool:
    """A bounded pool: callers wait (up to a few seconds) for a free connection
    instead of opening connections without limit under load."""
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def create_redis(settings: Settings, url: str, *, max_connections: int | None = None) -> Redis:
    """The process's Redis client (``decode_responses`` off: caches store bytes)."""
    pool = create_pool(settings, url, max_connections=max_connections)
    return aioredis.Redis.from_pool(pool)  # closes the pool on aclose()


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn redis-py connection errors into :class:`RedisUnavailable`."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RedisUnavailable(f"Redis unreachable: {exc}") from exc
    except redis.exceptions.OutOfMemoryError as exc:
        # With maxmemory-policy noeviction (the queue must not lose jobs) a full
        # Redis refuses writes: a temporary outage to callers, not a bug.
        raise RedisUnavailable(f"Redis is out of memory: {exc}") from exc


@asynccontextmanager
async def held_lock(
    client: Redis, name: str, *, wait: float, ttl: float = 30
) -> AsyncIterator[None]:
    """Hold a Redis lock for as long as the block runs, across processes.

    redis-py's lock expires after ``ttl`` unless renewed, so a process that dies
    holding it frees it within ``ttl``; while the block runs, a task renews it
    every ``ttl / 3`` seconds. Raises :class:`Busy` after ``wait`` seconds.
    """
    lock = client.lock(name, timeout=ttl, blocking_timeout=wait)
    async with translated():
        acquired = await lock.acquire()
    if not acquired:
        raise Busy(f"{name} is held by another process (waited {wait:.0f}s)")

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            await lock.reacquire()

    renewer = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError, redis.exceptions.RedisError):
            await renewer
        with contextlib.suppress(redis.exceptions.RedisError):
            await lock.release()
