"""The semantic cache's defaults are the ones measured on the labelled pairs, and the
checks refuse every kind of look-alike in them.

``tests/data/semantic_pairs.json`` is the labelled set; ``bench/semantic_threshold.py``
measures it through the service's own steps (canonical question, embedding, slots,
hybrid retrieval for the evidence check) on this session's PostgreSQL and Redis with
the offline embedder. Changing the embedder, the checks or the set without measuring
again (and updating the recorded thresholds) fails here.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from bench.semantic_threshold import (
    CACHE_OFF,
    DEFAULT_PAIRS,
    DEFAULT_SEMANTIC_THRESHOLD,
    HELDOUT_PAIRS,
    KINDS_DIFFERENT,
    KINDS_SAME,
    LOCAL_MEASURED_THRESHOLD,
    MAX_WRONG_SHARE,
    OFFLINE_MEASURED_THRESHOLD,
    Pair,
    Scored,
    load_pairs,
    measure_at,
    recommend,
    row_at,
    rows,
)
from devtools.embedded import EmbeddedRedis
from rag.answering.semantic_cache import (
    guard_words,
    guards_conflict,
    question_intent,
    question_slots,
    same_slots,
)
from rag.platform.settings import Settings
from tests.fixtures.services import PgServer, make_settings


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return load_pairs(DEFAULT_PAIRS)


@pytest.fixture(scope="module")
def both(pg_server: PgServer, redis_server: EmbeddedRedis, pairs: list[Pair]) -> list[list[Scored]]:
    """Both sets scored once for the module, on a database of its own."""
    heldout = load_pairs(HELDOUT_PAIRS)
    return asyncio.run(
        measure_at(make_settings(), pg_server.create_database(), redis_server.url, pairs, heldout)
    )


@pytest.fixture(scope="module")
def scored(both: list[list[Scored]]) -> list[Scored]:
    """The tuning set and the held-out set together, as the threshold is chosen."""
    return both[0] + both[1]


EVIDENCE = Settings.from_env({}).semantic_cache_evidence


def test_the_labelled_set_covers_two_courses_and_every_kind(pairs: list[Pair]) -> None:
    assert len(pairs) >= 300
    assert {p.course for p in pairs} == {"bread-science", "home-networking"}
    per_course = Counter(p.course for p in pairs)
    assert min(per_course.values()) >= 150
    kinds = Counter((p.course, p.kind) for p in pairs)
    for course in per_course:
        for kind in (*KINDS_SAME, *KINDS_DIFFERENT):
            assert kinds[(course, kind)] >= 5, (course, kind)
    assert sum(p.same for p in pairs) >= 0.4 * len(pairs)
    keys = [frozenset((p.a, p.b)) for p in pairs]
    assert len(set(keys)) == len(keys), "a pair appears twice"
    assert all(p.a != p.b for p in pairs)


def test_the_default_threshold_is_the_measured_one(scored: list[Scored]) -> None:
    assert recommend(rows(scored, EVIDENCE)) == OFFLINE_MEASURED_THRESHOLD
    # The default is the stricter of the offline and the real-model measurement.
    assert max(OFFLINE_MEASURED_THRESHOLD, LOCAL_MEASURED_THRESHOLD) == DEFAULT_SEMANTIC_THRESHOLD
    # The service uses the measured values.
    assert Settings.from_env({}).semantic_cache_threshold == DEFAULT_SEMANTIC_THRESHOLD
    assert EVIDENCE == 2


def test_cosine_alone_is_never_safe(scored: list[Scored]) -> None:
    # Every threshold up to 0.99 serves more than the bound of wrong answers on cosine
    # similarity alone: look-alikes embed like paraphrases.
    assert recommend(rows(scored, 0, slots=False)) == CACHE_OFF
    assert row_at(scored, 0.95, 0, slots=False).precision < 1 - MAX_WRONG_SHARE


def test_the_cache_refuses_every_kind_of_look_alike_at_the_default(scored: list[Scored]) -> None:
    for kind in KINDS_DIFFERENT:
        served = [
            s.pair
            for s in scored
            if s.pair.kind == kind and s.hits(DEFAULT_SEMANTIC_THRESHOLD, EVIDENCE)
        ]
        assert served == [], kind
    stats = row_at(scored, OFFLINE_MEASURED_THRESHOLD, EVIDENCE)
    assert 1 - stats.precision <= MAX_WRONG_SHARE


def test_the_cache_serves_paraphrases_that_pass_the_checks(scored: list[Scored]) -> None:
    stats = row_at(scored, OFFLINE_MEASURED_THRESHOLD, EVIDENCE)
    assert stats.hit_rate >= 0.3, f"hit rate {stats.hit_rate:.3f}"
    for kind in KINDS_SAME:
        assert any(
            s.hits(OFFLINE_MEASURED_THRESHOLD, EVIDENCE) for s in scored if s.pair.kind == kind
        ), kind


def test_the_held_out_set_was_written_apart_and_holds(both: list[list[Scored]]) -> None:
    tuning, heldout = both
    assert len(heldout) >= 200
    assert not {frozenset((s.pair.a, s.pair.b)) for s in heldout} & {
        frozenset((s.pair.a, s.pair.b)) for s in tuning
    }
    stats = row_at(heldout, DEFAULT_SEMANTIC_THRESHOLD, EVIDENCE)
    assert 1 - stats.precision <= MAX_WRONG_SHARE and stats.hit_rate > 0.15


def test_the_evidence_check_is_measured_from_real_retrieval(scored: list[Scored]) -> None:
    assert all(len(s.top_a) == 3 and len(s.top_b) == 3 for s in scored)
    different = [s for s in scored if s.pair.kind == "different-topic"]
    same = [s for s in scored if s.pair.same]

    # Questions about another topic retrieve other chunks more often than paraphrases.
    def apart(group: list[Scored]) -> float:
        return sum(not s.hits(0, 2, slots=False) for s in group) / len(group)

    assert apart(different) > apart(same)


def _same(a: str, b: str) -> bool:
    return same_slots(question_slots(a), question_slots(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Bake at 220 °C?", "Bake at 250°C?"),
        ("What is a /24 subnet?", "What is a /25 subnet?"),
        ("Is 1 Gbps enough?", "Is 10 Gbps enough?"),
        ("Is 802.11k for roaming?", "is 802.11r for roaming"),
        ("Is WPA2 safe?", "Is WPA3 safe?"),
        ("Is the DHCP server needed?", "Is the DHCP client needed?"),
        ('What does "levain" mean?', 'What does "poolish" mean?'),
        ("How do I convert Mbps to MB/s?", "How do I convert MB/s to Mbps?"),
        (
            "Does my laptop ask my router for an address?",
            "Does my router ask my laptop for an address?",
        ),
        ("What causes large holes?", "What causes small holes?"),
        ("Does more water make a more open crumb?", "Does less water make a more open crumb?"),
        ("Should I lower the QoS limit?", "Should I raise the QoS limit?"),
        ("How should I store bread for a day?", "How should I store bread for a month?"),
        ("What is a sourdough starter?", "How do I make a sourdough starter?"),
        ("Why does bread go stale?", "How do I keep bread from going stale?"),
        ("Should I knead the dough?", "Should I not knead the dough?"),
        ("Does VPN work on a Mac?", "Does VPN work on Windows?"),
    ],
)
def test_slots_tell_look_alikes_apart(a: str, b: str) -> None:
    assert not _same(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Should I bake at 220 °C?", "Is it best to bake at 220°C?"),
        ("How long should I knead bread dough by hand?", "How long to knead bread dough by hand"),
        ("WHAT IS THE POKE TEST", "what is the poke test?"),
        ("How do I enable QoS on my router?", "how do i enable qos on my router"),
        ("What is 802.11k?", "what is 802.11K"),
        ("For a crispy crust, should I use steam?", "Should I use steam for a crispy crust?"),
        ("Can salt and yeast touch?", "Can yeast and salt touch?"),
        (
            "What is the difference between WPA2 and WPA3?",
            "What is the difference between WPA3 and WPA2?",
        ),
        (
            "Why does bread go stale faster in the fridge?",
            "Why does bread in the fridge go stale more quickly?",
        ),
        ("When a DHCP lease expires, what happens?", "What happens when a DHCP lease expires?"),
    ],
)
def test_slots_let_paraphrases_through(a: str, b: str) -> None:
    assert _same(a, b)


def test_intents_and_guards() -> None:
    assert question_intent("Why is my crust pale?") == "reason"
    assert question_intent("How come my crust is pale?") == "reason"
    assert question_intent("How do I fix a pale crust?") == "procedure"
    assert question_intent("How long does bulk take?") == "duration"
    assert question_intent("Should I use steam?") == "yes-no"
    assert question_intent("In a starter, do the yeasts make the gas?") == "yes-no"
    assert question_intent("Bulk fermentation") == "explain"
    assert guard_words("Should I add salt before the autolyse?") == {"add", "before"}
    assert guard_words("Don't knead it") == {"not"}
    assert guard_words("How should I knead?") == frozenset()
    assert guards_conflict(("before",), ("after",))
    assert not guards_conflict(("faster",), ("more", "quickly"))
    assert not guards_conflict(("quickly",), ())
