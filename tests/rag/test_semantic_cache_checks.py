"""The semantic cache's evidence check, on its own (the pipeline tests are in
tests/workers/test_semantic_cache.py)."""

from __future__ import annotations

from rag.answering.semantic_cache import EVIDENCE_TOP, evidence_agrees


def test_questions_that_retrieve_the_same_best_chunks_agree() -> None:
    assert EVIDENCE_TOP == 3
    assert evidence_agrees([1, 2, 3, 9], [1, 2, 3, 7], 3)
    # Order within the best three does not matter, the rest of the list does not count.
    assert evidence_agrees([3, 1, 2], [1, 2, 3], 3)
    assert evidence_agrees([1, 2, 8], [1, 2, 3], 2)
    assert not evidence_agrees([1, 2, 8], [1, 2, 3], 3)
    assert not evidence_agrees([1, 2, 3, 4], [1, 5, 6, 2], 2)  # 2 is not in the best 3


def test_questions_that_retrieve_other_chunks_do_not() -> None:
    assert not evidence_agrees([4, 5, 6], [1, 2, 3], 1)
    assert not evidence_agrees([1, 5, 6], [1, 2, 3], 2)


def test_an_entry_without_its_retrieval_never_agrees_and_zero_turns_the_check_off() -> None:
    assert not evidence_agrees([1, 2, 3], [], 2)
    assert evidence_agrees([], [], 2)  # a course with no chunks
    assert evidence_agrees([1, 2, 3], [7, 8, 9], 0)


def test_short_lists_compare_over_the_shorter_one() -> None:
    assert evidence_agrees([1], [1, 2, 3], 2)
    assert not evidence_agrees([2], [1, 5, 6], 2)
