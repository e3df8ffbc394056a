"""The labelled retrieval sets name real topics: a renamed or removed topic would
otherwise turn a benchmark's hit into a silent miss (bench/retrieval_quality.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.courses import (
    COURSES,
    HELDOUT_RETRIEVAL_QUESTIONS,
    RETRIEVAL_QUESTIONS,
    load_retrieval_questions,
)
from rag.content.courses import load_course

TOPICS = {key: {t.key for t in load_course(path).topics} for key, path in COURSES.items()}


@pytest.mark.parametrize("path", [RETRIEVAL_QUESTIONS, HELDOUT_RETRIEVAL_QUESTIONS])
def test_every_label_is_a_topic_of_its_course(path: Path) -> None:
    data = load_retrieval_questions(path)
    items = data["questions"] + data.get("followups", [])
    assert len(items) >= 60
    unknown = [i for i in items if i["topic"] not in TOPICS[i["course"]]]
    assert unknown == []
    # Each set covers every topic of both courses, and no question is asked twice.
    for course, topics in TOPICS.items():
        assert {i["topic"] for i in items if i["course"] == course} == topics
    assert len({(i["course"], i["question"]) for i in data["questions"]}) == len(data["questions"])


def test_the_held_out_set_shares_no_question_with_the_tuning_set() -> None:
    tuning = load_retrieval_questions(RETRIEVAL_QUESTIONS)
    heldout = load_retrieval_questions(HELDOUT_RETRIEVAL_QUESTIONS)
    asked = {q["question"].casefold() for q in tuning["questions"] + tuning["followups"]}
    assert not asked & {q["question"].casefold() for q in heldout["questions"]}
