"""Feedback and the activity record, through the answer pipeline and the fake provider."""

from __future__ import annotations

import uuid

import pytest

from rag.answering import answers
from rag.answering.events import EventLog
from rag.answering.jobs import create_job, request_cancel
from rag.learners.feedback import give_feedback
from rag.platform.errors import InvalidInput, NotFound
from rag.platform.resources import Resources
from tests.fixtures.fake_openai import FakeServer
from tests.workers.test_semantic_cache import res

# The semantic cache's tests' fixture: the test course indexed through the fake server.
__all__ = ["res"]


async def _ask(res: Resources, question: str, user: str = "alice") -> tuple[uuid.UUID, str]:
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    job = await create_job(res.db, user_id=user, course_id=course_id, question=question)
    status = await answers.answer_question(res, EventLog(res.redis), job.id)
    return job.id, status


async def _served_by(res: Resources, job_id: uuid.UUID) -> str:
    return str(
        await res.db.fetch_value("SELECT served_by FROM assistant_jobs WHERE id = %s", (job_id,))
    )


async def _events(res: Resources, job_id: uuid.UUID) -> list[str]:
    rows = await res.db.fetch_value(
        "SELECT coalesce(array_agg(event_type ORDER BY id), '{}') FROM learner_activity_events"
        " WHERE payload ->> 'job_id' = %s",
        (str(job_id),),
    )
    return list(rows)


async def test_a_thumbs_down_takes_the_cached_answer_out_of_service(
    res: Resources, fake_openai: FakeServer
) -> None:
    first, _ = await _ask(res, "What happens during bulk fermentation?")
    repeat, _ = await _ask(res, "what happens during bulk fermentation", user="bob")
    assert await _served_by(res, repeat) == "semantic_cache"
    # Bob's thumbs-down on the answer he was served: the entry leaves service at once.
    feedback = await give_feedback(res.db, repeat, "bob", "down", "  It missed the point.  ")
    assert (feedback.rating, feedback.comment, feedback.flagged) == (
        "down",
        "It missed the point.",
        1,
    )
    flagged = await res.db.fetch_value("SELECT flagged_at IS NOT NULL FROM semantic_cache")
    assert flagged is True
    again, _ = await _ask(res, "What happens during bulk fermentation?", user="carol")
    assert await _served_by(res, again) == "generated"
    assert fake_openai.stats()["chat_calls"] == 2
    # A second rating replaces the first: one row, the new rating.
    await give_feedback(res.db, repeat, "bob", "up")
    rows = await res.db.fetch_value(
        "SELECT array_agg(rating) FROM job_feedback WHERE job_id = %s", (repeat,)
    )
    assert rows == ["up"]
    # The activity record: asked and answered once per job, each feedback once.
    assert await _events(res, first) == ["asked", "answered"]
    assert await _events(res, repeat) == ["asked", "answered", "feedback", "feedback"]
    served = await res.db.fetch_value(
        "SELECT payload FROM learner_activity_events"
        " WHERE event_type = 'answered' AND payload ->> 'job_id' = %s",
        (str(repeat),),
    )
    assert served["served_by"] == "semantic_cache" and served["not_covered"] is False
    assert served["topic_key"] and 0 < served["best_similarity"] <= 1.0001


async def test_a_thumbs_down_on_the_original_flags_the_entry_it_made(res: Resources) -> None:
    first, _ = await _ask(res, "How long should I knead the dough?")
    result = await give_feedback(res.db, first, "alice", "down")
    assert result.flagged == 1
    again, _ = await _ask(res, "How long should I knead the dough?", user="bob")
    assert await _served_by(res, again) == "generated"
    # The flagged entry stays for review; the new answer is not cached under it (one
    # entry per question and scope), so the question keeps being generated afresh.
    assert await res.db.fetch_value("SELECT count(*) FROM semantic_cache") == 1


async def test_feedback_is_the_owners_and_for_answers_only(
    res: Resources, fake_openai: FakeServer
) -> None:
    answered, _ = await _ask(res, "What is autolyse?")
    with pytest.raises(NotFound):
        await give_feedback(res.db, answered, "mallory", "down")
    with pytest.raises(NotFound):
        await give_feedback(res.db, uuid.uuid4(), "alice", "up")
    with pytest.raises(InvalidInput, match="at most 2000"):
        await give_feedback(res.db, answered, "alice", "up", "x" * 2001)
    fake_openai.add_faults({"endpoint": "chat", "kind": "status", "status": 400})
    failed, status = await _ask(res, "Why is my crust pale?")
    assert status == "failed"
    with pytest.raises(InvalidInput, match="only an answered question can get feedback"):
        await give_feedback(res.db, failed, "alice", "down")
    # A failure is recorded once, with the asking.
    assert await _events(res, failed) == ["asked", "failed"]
    assert await res.db.fetch_value("SELECT count(*) FROM job_feedback") == 0


async def test_a_queued_job_cancelled_is_recorded_once(res: Resources) -> None:
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    job = await create_job(res.db, user_id="alice", course_id=course_id, question="Salt?")
    cancelled = await request_cancel(res.db, job.id, "alice")
    assert cancelled is not None and cancelled.status == "cancelled"
    # Cancelling again changes nothing, and records nothing more.
    await request_cancel(res.db, job.id, "alice")
    assert await _events(res, job.id) == ["asked", "cancelled"]
    # Another user's request neither cancels nor records.
    other = await create_job(res.db, user_id="alice", course_id=course_id, question="Yeast?")
    assert await request_cancel(res.db, other.id, "mallory") is None
    assert await _events(res, other.id) == []
