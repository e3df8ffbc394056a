"""The semantic cache threshold is the one measured on the labelled pairs.

``tests/data/semantic_pairs.json`` is the labelled set; ``bench/semantic_threshold.py``
measures it. Changing the embedder or the set without re-measuring (and updating
``DEFAULT_SEMANTIC_THRESHOLD``) fails here.
"""

from __future__ import annotations

import pytest

from bench.semantic_threshold import (
    COSINE_ONLY_THRESHOLD,
    DEFAULT_DIMENSIONS,
    DEFAULT_PAIRS,
    DEFAULT_SEMANTIC_THRESHOLD,
    Pair,
    Result,
    load_pairs,
    measure,
)
from rag.semantic_cache import guard_words
from rag.settings import Settings


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return load_pairs(DEFAULT_PAIRS)


@pytest.fixture(scope="module")
def result(pairs: list[Pair]) -> Result:
    return measure(pairs, DEFAULT_DIMENSIONS)


@pytest.fixture(scope="module")
def guarded(pairs: list[Pair]) -> Result:
    return measure(pairs, DEFAULT_DIMENSIONS, guard=True)


def test_labelled_set_is_large_and_distinct(pairs: list[Pair]) -> None:
    assert sum(p.same for p in pairs) >= 50
    assert sum(not p.same for p in pairs) >= 60
    assert sum(p.kind == "near-miss" for p in pairs) >= 40
    keys = [frozenset((p.a, p.b)) for p in pairs]
    assert len(set(keys)) == len(keys), "a pair appears twice"
    assert all(p.a != p.b for p in pairs)


def test_default_threshold_is_the_measured_one(result: Result, guarded: Result) -> None:
    assert result.recommended == COSINE_ONLY_THRESHOLD
    assert guarded.recommended == DEFAULT_SEMANTIC_THRESHOLD
    # The service uses the measured value.
    assert Settings.from_env({}).semantic_cache_threshold == DEFAULT_SEMANTIC_THRESHOLD
    assert result.thresholds[0].threshold == 0.50
    assert result.thresholds[-1].threshold == 0.99


def test_no_false_hit_at_default(guarded: Result) -> None:
    stats = guarded.stats_at(DEFAULT_SEMANTIC_THRESHOLD)
    assert stats.false_hits == 0
    assert stats.precision == 1.0
    for pair, sim in zip(guarded.pairs, guarded.similarities, strict=True):
        if pair.kind in ("near-miss", "unrelated") and sim >= DEFAULT_SEMANTIC_THRESHOLD:
            assert guard_words(pair.a) != guard_words(pair.b), (pair, sim)


def test_default_threshold_serves_some_paraphrases(guarded: Result) -> None:
    stats = guarded.stats_at(DEFAULT_SEMANTIC_THRESHOLD)
    assert stats.hit_rate > 0.15, f"hit rate {stats.hit_rate:.3f}"


def test_why_no_cosine_threshold_is_safe(result: Result) -> None:
    # The near-misses that defeat every threshold up to 0.99 differ only in guard words.
    blockers = [
        pair
        for pair, sim in zip(result.pairs, result.similarities, strict=True)
        if not pair.same and sim >= 0.99
    ]
    assert (result.lowest_safe is None) == bool(blockers)
    for pair in blockers:
        assert guard_words(pair.a) != guard_words(pair.b), pair


def test_guard_words() -> None:
    assert guard_words("Should I add salt before the autolyse?") == {"before"}
    assert guard_words("Don't knead it") == {"not"}
    assert guard_words("Do not knead it") == {"not"}
    assert guard_words("How long should I knead?") == frozenset()
