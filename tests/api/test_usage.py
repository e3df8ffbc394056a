"""The admin usage report over usage_daily: sums, prices, pages, ranges."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.platform.db import Database
from rag.platform.settings import Settings
from tests.api.test_progress import bearer
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import write_course

Client = AsyncTestClient[Litestar]
SECRET = "r" * 40
TODAY = datetime.now(UTC).date()


@pytest.fixture
def api_settings() -> Settings:
    return make_settings(
        AUTH_JWT_SECRET=SECRET, MODEL_PRICES='{"m1": {"input": 1, "output": 10}}'
    )


@pytest.fixture
async def client(
    api_settings: Settings, db: Database, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[Client]:
    ids = []
    for key in ("alpha", "beta"):
        root = write_course(tmp_path / key, {"t": (1, 1, "T", "Text.")})
        (root / "course.yaml").write_text(f"key: {key}\ntitle: {key}\n")
        ids.append((await import_course(db, load_course(root))).course_id)
    rows: list[tuple[Any, ...]] = [
        # day, course, user, model, jobs, prompt, completion
        (TODAY, ids[0], "ann", "m1", 2, 1000, 100),
        (TODAY, ids[0], "ann", "m2", 1, 500, 50),  # m2 has no price
        (TODAY, ids[1], "bob", "m1", 1, 2000, 0),
        (TODAY - timedelta(days=1), ids[0], "bob", "m1", 3, 3000, 300),
        (TODAY - timedelta(days=40), ids[1], "cy", "m1", 9, 9, 9),  # outside the default range
    ]
    async with db.connection() as conn, conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO usage_daily (day, course_id, user_id, model, jobs, prompt_tokens,"
            " completion_tokens) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    app = create_app(api_settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


async def pages(client: Client, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        response = await client.get(
            "/v1/admin/usage", params={**params, "cursor": cursor}, headers=headers
        )
        assert response.status_code == 200, response.text
        items += response.json()["items"]
        cursor = response.json()["next_cursor"]
        if not cursor:
            return items


async def test_sums_by_user_course_and_day_priced_and_paged(
    client: Client, api_settings: Settings
) -> None:
    admin = bearer(api_settings, "root", admin=True)
    for limit in (1, 2, 100):
        users = await pages(client, admin, group="user", limit=limit)
        sums = [(u["key"], u["jobs"], u["prompt_tokens"], u["completion_tokens"]) for u in users]
        assert sums == [("ann", 3, 1500, 150), ("bob", 4, 5000, 300)], limit
    # Priced per million tokens; m2 costs 0 and is named as unpriced.
    assert users[0]["cost_usd"] == pytest.approx((1000 * 1 + 100 * 10) / 1e6)
    assert users[1]["cost_usd"] == pytest.approx((5000 * 1 + 300 * 10) / 1e6)
    first = await client.get("/v1/admin/usage", params={"group": "user"}, headers=admin)
    assert first.json()["unpriced"] == ["m2"]
    courses = await pages(client, admin, group="course", limit=1)
    assert [(c["key"], c["jobs"]) for c in courses] == [("alpha", 6), ("beta", 1)]
    days = await pages(client, admin, group="day", limit=1)
    assert [(d["key"], d["jobs"]) for d in days] == [
        (TODAY.isoformat(), 4), ((TODAY - timedelta(days=1)).isoformat(), 3)
    ]
    # An explicit range reaches further back.
    since = (TODAY - timedelta(days=45)).isoformat()
    wide = await pages(client, admin, group="user", since=since)
    assert [u["key"] for u in wide] == ["ann", "bob", "cy"]


async def test_only_administrators_and_ranges_in_our_words(
    client: Client, api_settings: Settings
) -> None:
    admin = bearer(api_settings, "root", admin=True)
    learner = await client.get("/v1/admin/usage", headers=bearer(api_settings, "ann"))
    assert learner.status_code == 403
    assert learner.json()["error"]["message"] == "the usage report is for administrators"
    backwards = await client.get(
        "/v1/admin/usage", params={"since": "2026-02-01", "until": "2026-01-01"}, headers=admin
    )
    assert backwards.status_code == 422
    assert backwards.json()["error"]["message"] == "since (2026-02-01) is after until (2026-01-01)"
    too_long = await client.get(
        "/v1/admin/usage", params={"since": "2024-01-01", "until": "2026-01-01"}, headers=admin
    )
    assert too_long.status_code == 422
    assert too_long.json()["error"]["message"] == "a report covers at most 366 days"
    page = await client.get("/v1/admin/usage", params={"group": "user", "limit": 1}, headers=admin)
    other = await client.get(
        "/v1/admin/usage",
        params={"group": "day", "cursor": page.json()["next_cursor"]},
        headers=admin,
    )
    assert other.status_code == 422
    assert date.fromisoformat(page.json()["until"]) == TODAY
