"""The one interface every model provider implements: batch embeddings and streaming chat."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
"""A ``(n, dimensions)`` float32 array, one L2-normalized row per input text."""


class ChatMessage(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: str


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatDelta(msgspec.Struct, frozen=True):
    """One piece of a streamed answer.

    ``text`` is the new text (may be empty on the last piece); ``usage`` and
    ``finish_reason`` arrive on the last piece only.
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class Provider(abc.ABC):
    """A model provider. Implementations translate their errors into ``rag.platform.errors``:
    :class:`~rag.platform.errors.ProviderUnavailable` (retryable) or
    :class:`~rag.platform.errors.ProviderRejected` (not retryable)."""

    #: Short name shown to users and stored with answers ("openai", "offline").
    name: str
    #: Model id of the vectors this provider returns; part of the embedding cache key.
    embedding_model: str
    dimensions: int

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` in one request; rows come back in input order."""

    @abc.abstractmethod
    def stream_chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 800
    ) -> AsyncIterator[ChatDelta]:
        """Stream a chat completion. Retries (if any) happen only before the first delta."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release network clients."""

    async def short_reply(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, time_limit: float
    ) -> str:
        """The whole text of a short completion (a rewrite, a yes/no), within
        ``time_limit`` seconds: raises :class:`~rag.platform.errors.ProviderError`
        or :class:`TimeoutError`, and always closes the stream."""
        parts: list[str] = []
        stream = self.stream_chat(messages, max_tokens=max_tokens)
        try:
            async with asyncio.timeout(time_limit):
                async for delta in stream:
                    parts.append(delta.text)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return "".join(parts)
