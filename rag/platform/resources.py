"""The clients a process holds (database pool, Redis, model provider), opened and closed
together."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rag.content.embeddings import EmbeddingCache
from rag.learners.progress import ModuleStates
from rag.platform import metrics
from rag.platform.db import Database
from rag.platform.redis import Redis, create_redis
from rag.platform.settings import Settings
from rag.platform.tokens import encoding
from rag.protection.concurrency import ModelSlots
from rag.providers.base import Provider


@dataclass
class Resources:
    settings: Settings
    db: Database
    redis: Redis
    provider: Provider
    #: Bounds concurrent generations (rag/protection/concurrency.py).
    model_slots: ModelSlots

    def embedding_cache(self) -> EmbeddingCache:
        """A cache with its own counters (one per reindex run or job)."""
        return EmbeddingCache(
            self.redis,
            self.provider,
            ttl=self.settings.embed_cache_ttl,
            batch_size=self.settings.embed_batch_size,
        )

    def module_states(self) -> ModuleStates:
        """Learners' module states (gating), cached in Redis for ``MODULE_STATE_TTL``."""
        return ModuleStates(self.db, self.redis, self.settings.module_state_ttl)


@contextlib.asynccontextmanager
async def open_resources(
    settings: Settings,
    *,
    database_url: str,
    redis_url: str | None = None,
    redis: Redis | None = None,
    check_schema: bool = True,
) -> AsyncIterator[Resources]:
    """Open the pool, Redis and the provider; close them in reverse order on exit.

    Pass ``redis`` to share a client built elsewhere (the worker hands arq's
    client in, so the process has one Redis pool); it is closed here too.
    With ``check_schema`` the database must be migrated and its embedding size
    must match the settings, or this raises :class:`~rag.platform.errors.SchemaError`.
    """
    async with contextlib.AsyncExitStack() as stack:
        # Load the tokenizer now (about 0.2 s of CPU): left to the first question, it
        # would run inside the event loop and hold up every job or request behind it.
        encoding()
        db = Database(settings, database_url)
        await db.open()
        stack.push_async_callback(db.close)
        if check_schema:
            await db.check_schema()
        if redis is None:
            if redis_url is None:
                raise ValueError("open_resources needs redis_url or redis")
            redis = create_redis(settings, redis_url)
        stack.push_async_callback(functools.partial(redis.aclose, close_connection_pool=True))
        from rag.providers import build_provider  # imports the chosen client library only

        provider = build_provider(settings, redis=redis)
        stack.push_async_callback(provider.aclose)
        slots = ModelSlots(
            redis,
            per_process=settings.model_concurrency_per_worker,
            total=settings.model_concurrency_total,
            # A lease outlives the longest generation, so a crashed worker's slot
            # comes back by itself and a live one's never expires under it.
            lease_seconds=settings.provider_generation_timeout + 30,
            wait_seconds=settings.model_slot_wait,
        )
        metrics.watch_pools(db.pool, redis.connection_pool)
        yield Resources(settings, db, redis, provider, slots)
