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
    LOCAL_MEASURED_THRESHOLD,
    OFFLINE_MEASURED_THRESHOLD,
    Pair,
    Result,
    load_pairs,
    measure,
)
from rag.semantic_cache import guard_words, question_slots, same_slots
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
    assert guarded.recommended == OFFLINE_MEASURED_THRESHOLD
    # The default is the stricter of the offline and the real-model measurement.
    assert max(OFFLINE_MEASURED_THRESHOLD, LOCAL_MEASURED_THRESHOLD) == DEFAULT_SEMANTIC_THRESHOLD
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
            assert not same_slots(question_slots(pair.a), question_slots(pair.b)), (pair, sim)


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


def test_question_slots_tell_look_alikes_apart() -> None:
    def same(a: str, b: str) -> bool:
        return same_slots(question_slots(a), question_slots(b))

    # Look-alikes: numbers and units, model names and acronyms, quoted terms,
    # a direction swap, opposites.
    assert not same("Bake at 220 °C?", "Bake at 250°C?")
    assert not same("What is a /24 subnet?", "What is a /25 subnet?")
    assert not same("Is 1 Gbps enough?", "Is 10 Gbps enough?")
    assert not same("Is 802.11k for roaming?", "Is 802.11r for roaming?")
    assert not same("Is the DHCP server needed?", "Is the DHCP client needed?")
    assert not same('What does "levain" mean?', 'What does "poolish" mean?')
    assert not same(
        "How do I convert active dry yeast to instant yeast?",
        "How do I convert instant yeast to active dry yeast?",
    )
    assert not same("What causes large holes?", "What causes small holes?")
    # Paraphrases, case and typing noise agree.
    assert same("Bake at 220 °C?", "Should I bake at 220°C?")
    assert same(
        "How long should I knead bread dough by hand?",
        "Can you tell me how long to knead bread dough by hand?",
    )
    assert same("WHAT IS THE POKE TEST", "what is the poke test?")
    assert same("What does salt do to yeast?", "What dose salt do to yeast?")
    assert same("What is 802.11k?", "what is 802.11K")


def test_guard_words() -> None:
    assert guard_words("Should I add salt before the autolyse?") == {"before"}
    assert guard_words("Don't knead it") == {"not"}
    assert guard_words("Do not knead it") == {"not"}
    assert guard_words("How long should I knead?") == frozenset()
