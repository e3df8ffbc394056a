"""Model providers behind one interface; :func:`build_provider` picks one from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rag.platform.redis import Redis
    from rag.platform.settings import Settings
    from rag.providers.base import Provider


def build_provider(settings: Settings, *, redis: Redis | None = None) -> Provider:
    """The provider ``settings.provider_kind`` names, ready to use (``aclose()`` it when done).

    ``redis`` holds the state of the circuit breaker a remote provider shares with every
    other process; without it calls go unguarded (tests, one-off scripts).
    """
    # Imported here: the offline provider must not pay for importing openai, and back.
    provider: Provider
    if settings.provider_kind == "openai":
        from rag.providers.openai import OpenAIProvider

        provider = OpenAIProvider(settings, redis=redis)
    else:
        from rag.providers.offline import OfflineProvider

        provider = OfflineProvider(dimensions=settings.embedding_dimensions)
    if settings.embedder == "local":
        from rag.providers.local import LocalEmbedder, WithLocalEmbeddings

        return WithLocalEmbeddings(provider, LocalEmbedder())
    return provider
