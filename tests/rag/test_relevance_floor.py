"""The relevance floor the service uses for the offline embedder is the one measured
on both courses' labelled questions (``bench/relevance.py``)."""

from __future__ import annotations

from bench.relevance import (
    DEFAULT_DIMENSIONS,
    QUESTION_FILES,
    load_questions,
    measure,
    offline_embed,
)
from rag.platform.settings import MEASURED_RELEVANCE_FLOORS, Settings


def test_the_offline_floor_is_the_measured_one_and_keeps_every_covered_question() -> None:
    result = measure(offline_embed(DEFAULT_DIMENSIONS))
    assert result.recommended == MEASURED_RELEVANCE_FLOORS["offline-hash-v1"]
    kept, refused = result.row(result.recommended)
    assert kept == 1.0 and refused > 0
    assert Settings.from_env({"PROVIDER": "offline"}).relevance_floor == result.recommended
    # Two courses, 30 covered and 30 uncovered questions each.
    assert len(QUESTION_FILES) == 2
    for path in QUESTION_FILES:
        covered, not_covered, _ = load_questions(path)
        assert len(covered) >= 30 and len(not_covered) >= 30
