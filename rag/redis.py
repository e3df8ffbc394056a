"""The Redis client: one bounded connection pool per process, errors translated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import redis.exceptions

from rag.errors import RedisUnavailable
from rag.settings import Settings

Redis = aioredis.Redis


def create_pool(settings: Settings, url: str) -> aioredis.BlockingConnectionPool:
    """A bounded pool: callers wait (up to a few seconds) for a free connection
    instead of opening connections without limit under load."""
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def create_redis(settings: Settings, url: str) -> Redis:
    """The process's Redis client (``decode_responses`` off: caches store bytes)."""
    return aioredis.Redis.from_pool(create_pool(settings, url))  # closes the pool on aclose()


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn redis-py connection errors into :class:`RedisUnavailable`."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RedisUnavailable(f"Redis unreachable: {exc}") from exc
