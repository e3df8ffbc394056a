"""The Redis client: one bounded connection pool per process, errors translated."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.connection import HiredisRespSerializer
from redis.typing import EncodableT

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
    instead of opening connections without limit under load. With ``REDIS_SENTINELS``
    its connections go to the primary the sentinels name, and follow a failover."""
    options: dict[str, Any] = {
        "max_connections": max_connections or settings.redis_max_connections,
        "timeout": 5,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry_on_timeout": False,
    }
    pool: aioredis.BlockingConnectionPool = (
        _sentinel_pool(settings, url, options)
        if settings.redis_sentinels
        else aioredis.BlockingConnectionPool.from_url(url, **options)
    )
    # The class the URL (or the sentinel pool) chose, TLS or Unix socket included.
    pool.connection_class = hiredis_packing(pool.connection_class)
    return pool


# Typed loosely: redis-py annotates its arguments as one list, though it takes them spread.
_hiredis_pack: Callable[..., list[bytes]] = HiredisRespSerializer().pack


class _HiredisPacking:
    """A connection that packs its commands with hiredis (C) rather than in Python.

    redis-py's asyncio connection packs every command argument by argument in
    Python, where its synchronous one uses ``hiredis.pack_command`` whenever hiredis
    is installed (it is: arq requires it). The difference is the command's size: an
    event-stream reader's ``XREAD`` over 50 open streams (``rag/answering/events.py``)
    took 50 µs to pack and takes 7.5, a short script call 5 and 1.5
    (``docs/benchmarks.md``). The bytes sent are the same (``tests/rag/test_redis.py``);
    a value Redis cannot take still raises ``DataError``. This uses redis-py's own
    serializer, the one its synchronous client uses.
    """

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _hiredis_pack(*args)


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` with :class:`_HiredisPacking`'s ``pack_command`` (its
    ``pack_commands``, for pipelines, packs through it); one subclass per class."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    if (packing := _PACKING.get(connection_class)) is None:
        name = f"HiredisPacking{connection_class.__name__}"
        made = type(name, (_HiredisPacking, connection_class), {})
        packing = cast(type[AbstractConnection], made)
        _PACKING[connection_class] = packing
    return packing


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The primary a Sentinel names, in a pool bounded like BlockingConnectionPool.

    redis-py's SentinelConnectionPool grows without bound (it subclasses the plain
    pool); this one takes the blocking pool's get/release through the MRO and keeps
    the sentinel's connection class: each new connection asks the sentinels for the
    primary, idle ones are dropped when it changes, and a connection that finds its
    server demoted (READONLY) disconnects so the next command reconnects."""


def _sentinel_pool(settings: Settings, url: str, options: dict[str, Any]) -> BlockingSentinelPool:
    params: dict[str, Any] = dict(parse_url(url))
    for unused in ("host", "port", "connection_class"):
        params.pop(unused, None)
    timeouts = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(settings.redis_sentinels),
        sentinel_kwargs={**timeouts, "password": params.get("password")},
    )
    return BlockingSentinelPool(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, sentinels, check_connection=True, **params, **options
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
