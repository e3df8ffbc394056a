"""POST /v1/jobs/{job_id}/feedback: the owner rates an answered job, in our words."""

from __future__ import annotations

import uuid

from rag.answering.jobs import create_job
from rag.platform.db import Database
from tests.api.test_questions import ALICE, BOB, Client, api_settings, client

__all__ = ["api_settings", "client"]  # the fixtures, shared with test_questions


async def _answered_job(db: Database) -> uuid.UUID:
    course_id = await db.fetch_value("SELECT id FROM courses")
    job = await create_job(db, user_id="alice", course_id=course_id, question="What is salt for?")
    await db.execute(
        "UPDATE assistant_jobs SET status = 'succeeded', answer = 'It tightens gluten.'"
        " WHERE id = %s",
        (job.id,),
    )
    return job.id


async def test_the_owner_rates_an_answer_and_may_change_the_rating(
    client: Client, db: Database
) -> None:
    job_id = await _answered_job(db)
    url = f"/v1/jobs/{job_id}/feedback"
    response = await client.post(
        url, json={"rating": "down", "comment": "Too vague"}, headers=ALICE
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["job_id"], body["rating"], body["comment"], body["flagged"]) == (
        str(job_id),
        "down",
        "Too vague",
        0,
    )
    again = await client.post(url, json={"rating": "up"}, headers=ALICE)
    assert again.json()["rating"] == "up" and again.json()["comment"] == ""
    assert await db.fetch_value("SELECT count(*) FROM job_feedback") == 1


async def test_feedback_refusals_are_4xx_in_one_shape(client: Client, db: Database) -> None:
    job_id = await _answered_job(db)
    url = f"/v1/jobs/{job_id}/feedback"
    other = await client.post(url, json={"rating": "up"}, headers=BOB)
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    bad = await client.post(url, json={"rating": "meh"}, headers=ALICE)
    assert bad.status_code == 400 and "error" in bad.json(), bad.text
    extra = await client.post(url, json={"rating": "up", "stars": 5}, headers=ALICE)
    assert extra.status_code == 400 and "error" in extra.json(), extra.text
    queued = await create_job(
        db,
        user_id="alice",
        course_id=await db.fetch_value("SELECT id FROM courses"),
        question="Still waiting?",
    )
    waiting = await client.post(
        f"/v1/jobs/{queued.id}/feedback", json={"rating": "up"}, headers=ALICE
    )
    assert waiting.status_code == 422
    assert "only an answered question can get feedback" in waiting.json()["error"]["message"]
