from __future__ import annotations

import numpy as np

from rag.content.embeddings import EmbeddingCache, cache_key, normalize_text
from rag.platform.redis import create_redis
from rag.providers.openai import OpenAIProvider
from tests.fixtures.fake_openai import FakeServer


def test_the_key_covers_model_dimensions_and_normalized_text() -> None:
    base = cache_key("m", 1536, "Why  does dough\nrise?")
    assert base == cache_key("m", 1536, "  Why does dough rise? ")
    assert base == cache_key("m", 1536, "Why does dough rise\N{FULLWIDTH QUESTION MARK}")  # NFKC
    assert base != cache_key("m", 768, "Why does dough rise?")
    assert base != cache_key("other", 1536, "Why does dough rise?")
    assert normalize_text(" a\u00a0 b\n") == "a b"


async def test_a_miss_calls_the_provider_and_a_hit_does_not(
    fake_openai: FakeServer, redis_url: str
) -> None:
    settings = fake_openai.settings(PROVIDER_MAX_ATTEMPTS="1")
    redis = create_redis(settings, redis_url)
    provider = OpenAIProvider(settings)
    try:
        cache = EmbeddingCache(redis, provider, ttl=60, batch_size=2)
        texts = ["proofing", "kneading", "proofing", "oven spring", "crumb"]
        first = await cache.embed(texts)
        # Four distinct texts in batches of two: two requests; the repeat is free.
        assert fake_openai.stats()["embeddings_calls"] == 2
        assert cache.stats.misses == 5 and cache.stats.hits == 0
        np.testing.assert_array_equal(first[0], first[2])
        second = await cache.embed(["crumb", "proofing"])
        assert fake_openai.stats()["embeddings_calls"] == 2  # no new call
        assert cache.stats.hits == 2
        np.testing.assert_array_equal(second[0], first[4])
        np.testing.assert_array_equal(second[1], first[0])
        # Stored as packed float32 under a TTL.
        key = cache_key(provider.embedding_model, provider.dimensions, "crumb")
        raw = await redis.get(key)
        assert raw is not None and len(raw) == 4 * provider.dimensions
        assert 0 < await redis.ttl(key) <= 60
    finally:
        await provider.aclose()
        await redis.aclose()


async def test_without_redis_the_cache_passes_through(fake_openai: FakeServer) -> None:
    settings = fake_openai.settings(PROVIDER_MAX_ATTEMPTS="1")
    redis = create_redis(settings, "redis://127.0.0.1:1/0")  # nothing listens there
    provider = OpenAIProvider(settings)
    try:
        cache = EmbeddingCache(redis, provider, ttl=60, batch_size=8)
        vectors = await cache.embed(["hydration", "autolyse"])
        assert vectors.shape == (2, provider.dimensions)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert fake_openai.stats()["embeddings_calls"] == 1
    finally:
        await provider.aclose()
        await redis.aclose()
