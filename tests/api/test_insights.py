"""Insight routes for a course's staff, and the caller's course list."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.answering.jobs import create_job
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.learners.feedback import give_feedback
from rag.learners.insights import (
    FEEDBACK_SQL,
    GAPS_SQL,
    PAGE_AFTER_SQL,
    QUESTIONS_SQL,
    refresh_stale,
    refresh_summaries,
)
from rag.platform.db import Database
from rag.platform.settings import Settings
from rag.protection.auth import issue_token
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import TOPICS, write_course
from workers.jobs import refresh_insights

Client = AsyncTestClient[Litestar]
SECRET = "i" * 40
BASE = "/v1/courses/test-course/insights"


@pytest.fixture
def api_settings() -> Settings:
    return make_settings(AUTH_JWT_SECRET=SECRET, DEV_IDENTITY_HEADER="true")


def who(user: str) -> dict[str, str]:
    return {"X-User-Id": user}


@pytest.fixture
async def client(
    api_settings: Settings, db: Database, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[Client]:
    await import_course(db, load_course(write_course(tmp_path / "c", TOPICS)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "course.yaml").write_text("key: other-course\ntitle: Other\n")
    (other / "x.md").write_text("---\nmodule: 1\nposition: 1\ntitle: X\n---\nText.\n")
    await import_course(db, load_course(other))
    await db.execute(
        "INSERT INTO enrollments (user_id, course_id, role)"
        " SELECT u, c.id, r FROM (VALUES ('ann', 'test-course', 'learner'),"
        " ('ivy', 'test-course', 'instructor'), ('oscar', 'other-course', 'instructor'),"
        " ('ann', 'other-course', 'learner')) v(u, k, r) JOIN courses c ON c.course_key = v.k"
    )
    app = create_app(api_settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


async def _refresh(db: Database) -> None:
    """What the worker's cron does (RELEVANCE_FLOOR is 0 in these settings)."""
    course_id = await db.fetch_value("SELECT id FROM courses WHERE course_key = 'test-course'")
    await refresh_summaries(db, course_id, below=0.1)


async def _answered(
    db: Database, question: str, ago: timedelta = timedelta(0), **payload: Any
) -> uuid.UUID:
    """A succeeded job of ann's and its answered event, as the worker records them."""
    course_id = await db.fetch_value("SELECT id FROM courses WHERE course_key = 'test-course'")
    job = await create_job(db, user_id="ann", course_id=course_id, question=question)
    await db.execute(
        "UPDATE assistant_jobs SET status = 'succeeded', answer = 'An answer.' WHERE id = %s",
        (job.id,),
    )
    body: dict[str, Any] = {"job_id": str(job.id), "question": question, "served_by": "generated"}
    body |= {"not_covered": False, "best_similarity": 0.9, "topic_key": "a"} | payload
    await db.execute(
        "INSERT INTO learner_activity_events (user_id, course_id, event_type, payload,"
        " created_at) VALUES ('ann', %s, 'answered', %s, now() - %s)",
        (course_id, json.dumps(body), ago),
    )
    return job.id


async def _all_pages(
    client: Client, url: str, headers: dict[str, str], **params: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        query = params | {"limit": 1, "cursor": cursor}
        response = await client.get(url, params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        if body["next_cursor"] is None:
            return items
        cursor = body["next_cursor"]


async def test_questions_are_grouped_by_cache_cluster_most_asked_first(
    client: Client, db: Database
) -> None:
    for q in ("What is autolyse?", "autolyse, what is it", "Explain autolyse"):
        await _answered(db, q, cache_entry=7, served_by="semantic_cache")
    for _ in range(2):
        await _answered(db, "Why does my dough tear?")
    await _answered(db, "How hot should the oven be?")
    await _answered(db, "Why is rye sticky?", ago=timedelta(days=3))
    # Before the worker's first refresh there is nothing, and the page says so.
    empty = await client.get(f"{BASE}/questions", headers=who("ivy"))
    assert empty.json() == {
        "items": [], "next_cursor": None, "window_days": 30, "refreshed_at": None
    }  # fmt: skip
    await _refresh(db)
    groups = await _all_pages(client, f"{BASE}/questions", who("ivy"))
    assert [(g["cluster"], g["asked"]) for g in groups][:1] == [("entry:7", 3)]
    assert [g["asked"] for g in groups] == [3, 2, 1, 1]
    assert groups[0]["served_from_cache"] == 3
    assert groups[0]["examples"] == [
        "Explain autolyse",
        "autolyse, what is it",
        "What is autolyse?",
    ]
    assert groups[1]["examples"] == ["Why does my dough tear?"] * 2
    # The one-day window leaves out the question of three days ago.
    today = await _all_pages(client, f"{BASE}/questions", who("ivy"), window=1)
    assert [g["asked"] for g in today] == [3, 2, 1]
    assert "Why is rye sticky?" not in {e for g in today for e in g["examples"]}
    # A page asked after another refresh says to start again (no item seen twice).
    first = await client.get(f"{BASE}/questions", params={"limit": 1}, headers=who("ivy"))
    await _refresh(db)
    stale = await client.get(
        f"{BASE}/questions",
        params={"limit": 1, "cursor": first.json()["next_cursor"]},
        headers=who("ivy"),
    )
    assert stale.status_code == 422
    assert "refreshed since the first page" in stale.json()["error"]["message"]
    bad_window = await client.get(f"{BASE}/questions?window=2", headers=who("ivy"))
    assert bad_window.status_code == 400


async def test_gaps_group_weak_answers_by_nearest_topic(client: Client, db: Database) -> None:
    await _answered(db, "Is the moon made of dough?", not_covered=True, topic_key="c")
    await _answered(db, "Can I bake on a rock?", not_covered=True, topic_key="c")
    await _answered(db, "Mixing by moonlight?", best_similarity=0.05, topic_key="a")
    await _answered(db, "How long to mix?", best_similarity=0.8, topic_key="a")  # not weak
    disliked = await _answered(db, "How warm should proofing be?", topic_key="b")
    await give_feedback(db, disliked, "ann", "down")
    await _refresh(db)
    found = await _all_pages(client, f"{BASE}/gaps", who("ivy"))
    summary = [(g["topic_key"], g["questions"], g["not_covered"], g["thumbs_down"]) for g in found]
    assert summary == [("c", 2, 2, 0), ("a", 1, 0, 0), ("b", 1, 0, 1)]
    assert found[0]["topic_title"] == "Baking"
    assert found[1]["examples"] == ["Mixing by moonlight?"]


async def test_feedback_newest_first_every_item_once(client: Client, db: Database) -> None:
    jobs = [await _answered(db, f"Question {n}?") for n in range(5)]
    for n, job_id in enumerate(jobs):
        await give_feedback(db, job_id, "ann", "down" if n % 2 else "up", f"note {n}")
    items = await _all_pages(client, f"{BASE}/feedback", who("ivy"))
    assert [i["comment"] for i in items] == [f"note {n}" for n in reversed(range(5))]
    downs = await client.get(f"{BASE}/feedback", params={"rating": "down"}, headers=who("ivy"))
    assert [i["comment"] for i in downs.json()["items"]] == ["note 3", "note 1"]


async def test_only_the_courses_staff_see_its_insights(
    client: Client, api_settings: Settings
) -> None:
    for path in ("questions", "gaps", "feedback"):
        for user in ("ann", "oscar", "stranger"):  # a learner, another course's staff
            response = await client.get(f"{BASE}/{path}", headers=who(user))
            assert response.status_code == 403, (path, user)
            assert response.json()["error"]["code"] == "forbidden"
    admin = {"Authorization": f"Bearer {issue_token(api_settings, 'root', admin=True)}"}
    assert (await client.get(f"{BASE}/gaps", headers=admin)).status_code == 200
    # Another course's page is not this course's: a cursor cannot cross kinds either.
    gaps = await client.get(f"{BASE}/gaps", params={"limit": 1}, headers=admin)
    assert gaps.status_code == 200
    bad = await client.get(f"{BASE}/questions", params={"cursor": "nope"}, headers=who("ivy"))
    assert bad.status_code == 422


async def test_the_course_list_is_the_callers_own(client: Client, api_settings: Settings) -> None:
    mine = await _all_pages(client, "/v1/courses", who("ann"))
    assert [(c["course_key"], c["role"]) for c in mine] == [
        ("other-course", "learner"),
        ("test-course", "learner"),
    ]
    staff = await _all_pages(client, "/v1/courses", who("ivy"))
    assert [(c["course_key"], c["role"]) for c in staff] == [("test-course", "instructor")]
    assert await _all_pages(client, "/v1/courses", who("stranger")) == []
    admin = {"Authorization": f"Bearer {issue_token(api_settings, 'root', admin=True)}"}
    every = await _all_pages(client, "/v1/courses", admin)
    assert [c["course_key"] for c in every] == ["other-course", "test-course"]


async def _plan(db: Database, sql: str, params: dict[str, Any]) -> str:
    async with db.transaction() as conn:
        cur = await conn.execute(b"EXPLAIN " + sql.encode(), params)
        return "\n".join(r[0] for r in await cur.fetchall())


async def test_insight_queries_read_their_indexes(client: Client, db: Database) -> None:
    # Many events of other types and courses, so that a scan would be the costly choice.
    await db.execute(
        "INSERT INTO learner_activity_events (user_id, course_id, event_type, payload, created_at)"
        " SELECT 'u' || n % 50, c.id, (ARRAY['asked', 'answered', 'failed'])[n % 3 + 1],"
        " '{}', now() - make_interval(mins => n) FROM generate_series(1, 20000) n, courses c"
    )
    await db.execute("ANALYZE learner_activity_events")
    course_id = await db.fetch_value("SELECT id FROM courses WHERE course_key = 'test-course'")
    # The refresh reads the window's events through their index...
    window = {"course_id": course_id, "window": 1, "below": 0.2}
    for sql in (QUESTIONS_SQL, GAPS_SQL):
        plan = await _plan(db, sql, window)
        assert "Index Scan on learner_activity_events" in plan, plan
        assert "Seq Scan on learner_activity_events" not in plan, plan
    # ...and a page, whatever the events' volume, is a range of the summaries' key.
    await refresh_summaries(db, course_id, below=0.2)
    page = {"course_id": course_id, "kind": "questions", "window": 30, "limit": 21}
    plan = await _plan(db, PAGE_AFTER_SQL, page | {"neg_count": -5, "key": "entry:1"})
    assert "insight_summaries_pkey" in plan, plan
    plan = await _plan(db, FEEDBACK_SQL, {"course_id": course_id, "rating": None, "limit": 21})
    assert "job_feedback_course_idx" in plan, plan


async def test_the_worker_refreshes_only_courses_with_new_activity(
    client: Client, db: Database
) -> None:
    course_id = await db.fetch_value("SELECT id FROM courses WHERE course_key = 'test-course'")
    assert await refresh_stale(db, below=0.1) == []  # no activity anywhere yet
    await _answered(db, "What is autolyse?")
    assert await refresh_stale(db, below=0.1) == [course_id]
    assert await refresh_stale(db, below=0.1) == []  # nothing new since
    page = await client.get(f"{BASE}/questions", headers=who("ivy"))
    assert [g["asked"] for g in page.json()["items"]] == [1]
    assert page.json()["refreshed_at"] is not None
    # The job the worker's cron runs does the same.
    await _answered(db, "What is autolyse?")
    # (Its context needs only the database and the settings of the resources.)
    context = {"res": SimpleNamespace(db=db, settings=make_settings())}
    assert await refresh_insights(context) == {"courses": 1}
    page = await client.get(f"{BASE}/questions", headers=who("ivy"))
    assert [g["asked"] for g in page.json()["items"]] == [2]
