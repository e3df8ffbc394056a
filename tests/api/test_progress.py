"""The progress and module routes: who may report progress, and what a learner sees."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.platform.db import Database
from rag.platform.settings import Settings
from rag.protection.auth import issue_token
from tests.fixtures.services import make_settings
from tests.rag.test_progress import _course

Client = AsyncTestClient[Litestar]
SECRET = "p" * 40
PROGRESS = "/v1/courses/gated/progress"
MODULES = "/v1/courses/gated/modules"


@pytest.fixture
def api_settings() -> Settings:
    # A long TTL: the test shows the cached state is dropped, not that it expired.
    return make_settings(AUTH_JWT_SECRET=SECRET, MODULE_STATE_TTL="3600")


def bearer(
    settings: Settings, user: str, *, admin: bool = False, platform: bool = False
) -> dict[str, str]:
    token = issue_token(settings, user, admin=admin, platform=platform)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def client(
    api_settings: Settings, db: Database, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[Client]:
    await import_course(db, load_course(_course(tmp_path / "c")))
    await db.execute("INSERT INTO enrollments (user_id, course_id) SELECT 'ann', id FROM courses")
    app = create_app(api_settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


def _items(*topics: str, user: str = "ann", completed: bool = True) -> dict[str, object]:
    return {"items": [{"user_id": user, "topic_key": t, "completed": completed} for t in topics]}


async def _unlocked(client: Client, headers: dict[str, str]) -> list[int]:
    response = await client.get(MODULES, headers=headers)
    assert response.status_code == 200, response.text
    return [m["number"] for m in response.json()["items"] if m["unlocked"]]


async def test_a_learner_reads_their_modules_and_the_platform_unlocks_the_next(
    client: Client, api_settings: Settings
) -> None:
    ann = bearer(api_settings, "ann")
    response = await client.get(MODULES, headers=ann)
    assert response.json() == {
        "course_key": "gated",
        "unlock": "sequential",
        "items": [
            {"number": 1, "title": "One", "unlocked": True, "topics_done": 0,
             "topics_total": 2, "mode": "answer", "waiting_for": []},
            {"number": 2, "title": "Two", "unlocked": False, "topics_done": 0,
             "topics_total": 1, "mode": "answer", "waiting_for": [1]},
        ],
    }  # fmt: skip
    platform = bearer(api_settings, "lms", platform=True)
    done = await client.put(PROGRESS, json=_items("a", "b"), headers=platform)
    assert done.status_code == 200, done.text
    assert done.json() == {"received": 2, "changed": 2, "users": ["ann"]}
    # The cached state (an hour's TTL) is dropped at once: module 2 is open now.
    assert await _unlocked(client, ann) == [1, 2]
    # The same report again changes nothing: idempotent.
    again = await client.put(PROGRESS, json=_items("a", "b"), headers=platform)
    assert again.json() == {"received": 2, "changed": 0, "users": []}
    # An administrator may report too; un-completing a topic locks module 2 again.
    admin = bearer(api_settings, "root", admin=True)
    undone = await client.put(PROGRESS, json=_items("b", completed=False), headers=admin)
    assert undone.json()["changed"] == 1
    assert await _unlocked(client, ann) == [1]


async def test_learners_cannot_report_progress(client: Client, api_settings: Settings) -> None:
    response = await client.put(
        PROGRESS, json=_items("a", "b"), headers=bearer(api_settings, "ann")
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert "the course platform's credential" in response.json()["error"]["message"]
    assert await _unlocked(client, bearer(api_settings, "ann")) == [1]
    # Without any credential it is a 401, as everywhere.
    assert (await client.put(PROGRESS, json=_items("a"))).status_code == 401


async def test_bad_progress_reports_are_refused_in_our_words(
    client: Client, api_settings: Settings
) -> None:
    platform = bearer(api_settings, "lms", platform=True)
    unknown = await client.put(PROGRESS, json=_items("a", "nope"), headers=platform)
    assert unknown.status_code == 422
    assert unknown.json()["error"]["details"] == {"unknown_topics": ["nope"]}
    bad_user = await client.put(PROGRESS, json=_items("a", user="no spaces"), headers=platform)
    assert bad_user.status_code == 422
    assert "user_id 'no spaces'" in bad_user.json()["error"]["message"]
    item = {"user_id": "ann", "topic_key": "a", "completed": True}
    too_many = {"items": [item] * 1001}
    response = await client.put(PROGRESS, json=too_many, headers=platform)
    assert response.status_code == 422
    assert "at most 1000 progress items" in response.json()["error"]["message"]
    missing = await client.put("/v1/courses/no-such/progress", json=_items("a"), headers=platform)
    assert missing.status_code == 404


async def test_only_enrolled_learners_read_a_courses_modules(
    client: Client, api_settings: Settings
) -> None:
    response = await client.get(MODULES, headers=bearer(api_settings, "stranger"))
    assert response.status_code == 403
    assert "not enrolled" in response.json()["error"]["message"]
    assert await _unlocked(client, bearer(api_settings, "root", admin=True)) == [1]


async def test_a_topics_text_is_for_enrolled_readers_and_a_locked_module_waits(
    client: Client, api_settings: Settings
) -> None:
    """The text a citation opens is read as retrieval reads: enrolled users only, and
    not a module still locked for the caller."""
    ann = bearer(api_settings, "ann")
    opened = await client.get("/v1/courses/gated/topics/a", headers=ann)
    assert opened.status_code == 200, opened.text
    topic = opened.json()
    assert (topic["topic_key"], topic["title"], topic["module_title"]) == ("a", "a", "One")
    assert topic["html"] == "<p>Text a.</p>\n" and topic["markdown"] == "Text a."
    locked = await client.get("/v1/courses/gated/topics/c", headers=ann)
    assert locked.status_code == 403
    assert locked.json()["error"]["message"] == (
        "the topic 'c' is in module 2, which is locked until you complete module(s) 1"
    )
    assert locked.json()["error"]["details"] == {"module": 2, "waiting_for": [1]}
    # An administrator reads any module; a stranger none; an unknown topic is a 404.
    assert (await client.get("/v1/courses/gated/topics/c", headers=bearer(
        api_settings, "root", admin=True))).status_code == 200  # fmt: skip
    stranger = await client.get("/v1/courses/gated/topics/a", headers=bearer(api_settings, "zed"))
    assert stranger.status_code == 403 and "not enrolled" in stranger.json()["error"]["message"]
    missing = await client.get("/v1/courses/gated/topics/nope", headers=ann)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no topic 'nope' in the course 'gated'"
    # Once the platform reports module 1 done, module 2's text opens.
    platform = bearer(api_settings, "lms", platform=True)
    assert (await client.put(PROGRESS, json=_items("a", "b"), headers=platform)).status_code == 200
    assert (await client.get("/v1/courses/gated/topics/c", headers=ann)).status_code == 200
