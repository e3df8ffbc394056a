"""How many generations run at once: per worker process, and across all workers.

The provider's capacity (and the bill) is shared by every worker, so the total
is a Redis semaphore: a sorted set of leases scored by their expiry on Redis's
clock, taken and freed by one script call each. A worker that dies holding a
lease loses it when the lease expires (longer than the longest generation), so
a crash cannot leak capacity. Per process it is an ``asyncio.Semaphore``.

No library here: the Redis semaphores on PyPI are either synchronous, keep
their own connections, or count on the client's clock.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.exceptions

from rag.platform.errors import ModelBusy
from rag.platform.redis import Redis

log = logging.getLogger("rag.protection.concurrency")

KEY = "model:slots"

# KEYS[1] the set; ARGV: token, limit, lease ms. 1 if a slot was taken.
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
return 0
"""


class ModelSlots:
    """At most ``per_process`` generations in this process and ``total`` in all
    processes sharing ``client`` (0: no bound)."""

    def __init__(
        self,
        client: Redis,
        *,
        per_process: int,
        total: int,
        lease_seconds: float,
        wait_seconds: float,
        poll_seconds: float = 0.05,
    ) -> None:
        self.client = client
        self.total = total
        self.lease_ms = int(lease_seconds * 1000)
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self._local = asyncio.Semaphore(per_process) if per_process > 0 else None
        self._acquire: Any = client.register_script(_ACQUIRE) if total > 0 else None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; :class:`ModelBusy` (retryable)
        after ``wait_seconds`` without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        if self._local is not None:
            try:
                await asyncio.wait_for(self._local.acquire(), self.wait_seconds)
            except TimeoutError:
                raise _busy(self.wait_seconds) from None
        try:
            token = await self._take_shared(deadline)
            try:
                yield
            finally:
                if token is not None:
                    await self._give_back(token)
        finally:
            if self._local is not None:
                self._local.release()

    async def _take_shared(self, deadline: float) -> str | None:
        if self._acquire is None:
            return None
        token = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        while True:
            try:
                taken = await self._acquire(keys=[KEY], args=[token, self.total, self.lease_ms])
            except redis.exceptions.RedisError as exc:
                # No shared state: the per-process bound still holds; do not fail answers.
                log.warning("model slots unavailable (%s); not bounding across workers", exc)
                return None
            if taken:
                return token
            if loop.time() >= deadline:
                raise _busy(self.wait_seconds)
            await asyncio.sleep(self.poll_seconds)

    async def _give_back(self, token: str) -> None:
        try:
            await self.client.zrem(KEY, token)
        except redis.exceptions.RedisError as exc:
            log.warning("could not free a model slot (it expires by itself): %s", exc)

    async def in_use(self) -> int:
        """Leases currently held across all workers (expired ones included until swept)."""
        return int(await self.client.zcard(KEY))


def _busy(waited: float) -> ModelBusy:
    return ModelBusy(
        f"every model slot stayed busy for {waited:g}s (MODEL_CONCURRENCY_*); try again"
    )
