"""The exact embedding cache: identical text is embedded once, then read from Redis.

Key: ``emb:v1:`` + sha256 of (model id, dimensions, normalized text); value:
the vector packed as little-endian float32 (1536 dims = 6 KiB), with a TTL.
A batch is looked up with one ``MGET`` and the misses written with one
pipelined round trip. Redis being down makes the cache a pass-through (with a
warning), never a failure: it saves money, it holds nothing we cannot rebuild.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis.exceptions

from rag.platform.redis import Redis
from rag.providers.base import Provider, Vectors

log = logging.getLogger("rag.content.embeddings")
_SPACES = re.compile(r"\s+")
_MGET_SLICE = 512  # keys per MGET: bounded reply size at 1536 dims (~3 MiB)


def normalize_text(text: str) -> str:
    """NFKC and collapsed whitespace: what is embedded and what is hashed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def cache_key(model: str, dimensions: int, text: str) -> str:
    return _normalized_key(model, dimensions, normalize_text(text))


def _normalized_key(model: str, dimensions: int, normalized: str) -> str:
    digest = hashlib.sha256(f"{model}\x00{dimensions}\x00{normalized}".encode())
    return "emb:v1:" + digest.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    provider_calls: int = 0


class EmbeddingCache:
    """Embeds texts through Redis, calling the provider only for misses, in batches."""

    def __init__(self, redis: Redis, provider: Provider, *, ttl: int, batch_size: int) -> None:
        self.redis = redis
        self.provider = provider
        self.ttl = ttl
        self.batch_size = batch_size
        self.stats = CacheStats()

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        try:
            for i in range(0, len(keys), _MGET_SLICE):
                out.extend(await self.redis.mget(keys[i : i + _MGET_SLICE]))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("embedding cache unavailable, embedding without it: %s", exc)
            return [None] * len(keys)
        return out

    async def _store(self, items: list[tuple[str, bytes]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, ex=self.ttl)
                await pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("embedding cache write skipped: %s", exc)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """One L2-normalized float32 row per text, in order."""
        dims = self.provider.dimensions
        result = np.zeros((len(texts), dims), dtype=np.float32)
        if not texts:
            return result
        normalized = [normalize_text(t) for t in texts]
        model = self.provider.embedding_model
        keys = [_normalized_key(model, dims, t) for t in normalized]
        cached = await self._mget(keys)
        # Misses, deduplicated: the same text twice in a batch costs one embedding.
        missing: dict[str, list[int]] = {}
        for i, raw in enumerate(cached):
            if raw is not None and len(raw) == dims * 4:
                result[i] = np.frombuffer(raw, dtype="<f4")
                self.stats.hits += 1
            else:
                missing.setdefault(keys[i], []).append(i)
        self.stats.misses += sum(len(v) for v in missing.values())
        todo = list(missing.items())
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            vectors = await self.provider.embed([normalized[rows[0]] for _, rows in batch])
            self.stats.provider_calls += 1
            writes: list[tuple[str, bytes]] = []
            for (key, rows), vector in zip(batch, vectors, strict=True):
                result[rows] = vector
                writes.append((key, vector.astype("<f4").tobytes()))
            await self._store(writes)
        return result
