from __future__ import annotations

import base64
import math
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.learners import history
from rag.platform.db import Database
from rag.platform.settings import Settings
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import write_course

Client = AsyncTestClient[Litestar]

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}

# Written out of order, with gaps in positions; module 3 has no title in course.yaml.
TOPICS = {
    f"t{module}-{position}": (module, position, f"Topic {module}.{position}", "Some text.")
    for module, position in [
        (3, 2), (1, 4), (2, 1), (1, 1), (3, 1), (1, 2), (2, 7), (1, 3), (2, 3), (3, 9), (2, 2),
    ]
}  # fmt: skip
MODULES = {1: "Basics", 2: "Shaping", 3: "Baking"}
T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def api_settings() -> Settings:
    return make_settings(DEV_IDENTITY_HEADER="true", DEV_AUTO_ENROLL="true")


@pytest.fixture
async def course_id(db: Database, tmp_path: Path) -> int:
    root = write_course(tmp_path / "c", TOPICS)
    modules = "".join(f"  {n}: {title}\n" for n, title in MODULES.items())
    (root / "course.yaml").write_text(f"key: test-course\ntitle: Test course\nmodules:\n{modules}")
    return (await import_course(db, load_course(root))).course_id


@pytest.fixture
async def client(
    api_settings: Settings, course_id: int, database_url: str, redis_url: str
) -> AsyncIterator[Client]:
    app = create_app(api_settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


async def add_sessions(
    db: Database, user_id: str, course_id: int, times: list[datetime]
) -> list[tuple[datetime, uuid.UUID]]:
    """One session per time; returns (updated_at, id) pairs."""
    rows = [(t, uuid.uuid4()) for t in times]
    async with db.connection() as conn, conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO chat_sessions (id, user_id, course_id, title, updated_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            [(sid, user_id, course_id, f"{user_id} {i}", t) for i, (t, sid) in enumerate(rows)],
        )
    return rows


async def add_messages(db: Database, session_id: uuid.UUID, count: int) -> list[int]:
    """``count`` messages (alternating roles), all with the same created_at; returns ids."""
    async with db.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO chat_messages (session_id, job_id, role, content, created_at)"
            " SELECT %(s)s, gen_random_uuid(),"
            "        CASE WHEN n %% 2 = 0 THEN 'user' ELSE 'assistant' END, 'message ' || n,"
            "        %(t)s"
            "   FROM generate_series(1, %(count)s) AS n RETURNING id",
            {"s": session_id, "t": T0, "count": count},
        )
        return [row[0] for row in await cur.fetchall()]


async def walk(
    client: Client, url: str, limit: int, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every item of a list, following next_cursor; checks each page's size."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {**(params or {}), "limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await client.get(url, params=query, headers=ALICE)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"items", "next_cursor"}
        pages += 1
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        # Only the last page may be short, and a full last page has no cursor.
        assert len(body["items"]) == limit
    assert pages == max(1, math.ceil(len(items) / limit))
    return items


LIMITS = [1, 2, 7, 100]


async def test_sessions_pages_hold_each_session_once_newest_first(
    client: Client, db: Database, course_id: int
) -> None:
    # Five sessions share one updated_at: only the id tie-break orders them.
    same = T0 + timedelta(hours=1)
    mine = await add_sessions(
        db, "alice", course_id, [T0, same, same, T0 + timedelta(hours=2), same, same, same, T0]
    )
    theirs = await add_sessions(db, "bob", course_id, [same, same, T0])
    other_course = await db.fetch_value(
        "INSERT INTO courses (course_key, title) VALUES ('other', 'Other') RETURNING id"
    )
    elsewhere = await add_sessions(db, "alice", other_course, [same])
    expected = [str(sid) for _, sid in sorted(mine, reverse=True)]
    for limit in LIMITS:
        items = await walk(client, "/v1/sessions", limit, {"course_key": "test-course"})
        assert [item["id"] for item in items] == expected, limit
    first = items[0]
    assert set(first) == {"id", "title", "message_count", "created_at", "updated_at"}
    assert datetime.fromisoformat(first["updated_at"]) == T0 + timedelta(hours=2)
    listed = {item["id"] for item in items}
    assert not listed & {str(sid) for _, sid in theirs + elsewhere}
    bobs = await client.get("/v1/sessions", params={"course_key": "test-course"}, headers=BOB)
    assert [i["id"] for i in bobs.json()["items"]] == [
        str(sid) for _, sid in sorted(theirs, reverse=True)
    ]


async def test_a_user_with_no_sessions_gets_an_empty_page(client: Client) -> None:
    response = await client.get("/v1/sessions", params={"course_key": "test-course"}, headers=BOB)
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


async def test_sessions_of_an_unknown_course_are_a_404(client: Client) -> None:
    response = await client.get("/v1/sessions", params={"course_key": "nope"}, headers=ALICE)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_messages_pages_hold_each_message_once_newest_first(
    client: Client, db: Database, course_id: int
) -> None:
    [(_, session), (_, other)] = await add_sessions(db, "alice", course_id, [T0, T0])
    ids = await add_messages(db, session, 13)
    await add_messages(db, other, 3)
    url = f"/v1/sessions/{session}/messages"
    for limit in LIMITS:
        items = await walk(client, url, limit)
        assert [item["id"] for item in items] == sorted(ids, reverse=True), limit
    assert items[-1]["content"] == "message 1" and items[-1]["role"] == "assistant"
    assert items[-1]["citations"] == [] and items[-1]["cached"] is False
    empty = await add_sessions(db, "alice", course_id, [T0])
    response = await client.get(f"/v1/sessions/{empty[0][1]}/messages", headers=ALICE)
    assert response.json() == {"items": [], "next_cursor": None}


async def test_another_users_session_is_a_404_like_a_missing_one(
    client: Client, db: Database, course_id: int
) -> None:
    [(_, session)] = await add_sessions(db, "alice", course_id, [T0])
    await add_messages(db, session, 2)
    theirs = await client.get(f"/v1/sessions/{session}/messages", headers=BOB)
    missing = await client.get(f"/v1/sessions/{uuid.uuid4()}/messages", headers=BOB)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    # A cursor from the owner's pages does not open the session either.
    page = await client.get(f"/v1/sessions/{session}/messages?limit=1", headers=ALICE)
    cursor = page.json()["next_cursor"]
    assert cursor is not None
    stolen = await client.get(
        f"/v1/sessions/{session}/messages", params={"cursor": cursor}, headers=BOB
    )
    assert stolen.status_code == 404


async def test_topics_come_in_module_then_position_order_with_module_titles(
    client: Client,
) -> None:
    expected = sorted((m, p) for m, p, _, _ in TOPICS.values())
    for limit in LIMITS:
        items = await walk(client, "/v1/courses/test-course/topics", limit)
        assert [(t["module_number"], t["position"]) for t in items] == expected, limit
    assert items[0] == {
        "id": items[0]["id"],
        "topic_key": "t1-1",
        "module_number": 1,
        "module_title": "Basics",
        "position": 1,
        "title": "Topic 1.1",
    }
    titles = {t["module_number"]: t["module_title"] for t in items}
    assert titles == MODULES
    unknown = await client.get("/v1/courses/nope/topics", headers=ALICE)
    assert unknown.status_code == 404


async def test_under_dev_auto_enroll_every_course_is_the_callers_to_pick(
    client: Client, db: Database, course_id: int
) -> None:
    """Asking enrolls (DEV_AUTO_ENROLL), so the page lists every course, with the
    caller's own role where they have one; the topic text enrolls like a question."""
    await db.execute(
        "INSERT INTO enrollments (user_id, course_id, role) VALUES ('bob', %s, 'instructor')",
        (course_id,),
    )
    for who, role in ((ALICE, "learner"), (BOB, "instructor")):
        page = await client.get("/v1/courses", headers=who)
        assert page.status_code == 200, page.text
        assert page.json()["items"] == [{"course_key": "test-course", "title": "Test course",
                                         "description": "", "role": role}]  # fmt: skip
    text = await client.get("/v1/courses/test-course/topics/t2-7", headers=ALICE)
    assert text.status_code == 200 and text.json()["title"] == "Topic 2.7"
    assert await db.fetch_value(
        "SELECT role FROM enrollments WHERE user_id = 'alice' AND course_id = %s", (course_id,)
    ) == "learner"


async def test_a_topic_page_is_one_statement_whatever_its_size(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "/v1/courses/test-course/topics"
    warm = await client.get(url, params={"limit": 1}, headers=ALICE)  # fills the course cache
    statements: list[str] = []
    execute = psycopg.AsyncCursor.execute

    async def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        # The pool's liveness check runs an empty statement, and a connection the
        # pool opens meanwhile (in the background) looks up pgvector's types.
        if query and "pg_type" not in str(query):
            statements.append(str(query))
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", counted)
    for params in ({"limit": 100}, {"limit": 5, "cursor": warm.json()["next_cursor"]}):
        statements.clear()
        response = await client.get(url, params=params, headers=ALICE)
        assert response.status_code == 200 and response.json()["items"]
        assert len(statements) == 1, statements


def _cursor(payload: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(payload)).decode().rstrip("=")


BAD_CURSORS = [
    # (An empty cursor is the first page: test_an_empty_cursor_is_the_first_page...)
    "not a cursor",
    "%%%",
    "é",
    "x" * 500,
    _cursor(["m", 1]) + "\n",
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),  # not JSON
    _cursor({"a": 1}),  # JSON of the wrong shape
    _cursor(["s", "2025-01-01T00:00:00", str(uuid.uuid4())]),  # naive time
    _cursor(["s", "yesterday", str(uuid.uuid4())]),
    _cursor(["m", 2**70]),  # beyond bigint
    _cursor(["m", -1]),
    _cursor(["t", 1, 2**40]),
    _cursor(["x", 1]),  # no such list
]


async def _every_list(db: Database, course_id: int) -> tuple[uuid.UUID, dict[str, dict[str, str]]]:
    """A session of alice's, and each list's URL with its required query."""
    [(_, session)] = await add_sessions(db, "alice", course_id, [T0])
    urls: dict[str, dict[str, str]] = {
        "/v1/sessions": {"course_key": "test-course"},
        f"/v1/sessions/{session}/messages": {},
        "/v1/courses/test-course/topics": {},
    }
    return session, urls


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ({"limit": "0"}, 422, "limit must be between 1 and 100, not 0"),
        ({"limit": "-3"}, 422, "limit must be between 1 and 100, not -3"),
        ({"limit": "101"}, 422, "limit must be between 1 and 100, not 101"),
        ({"limit": "ten"}, 400, "the request is not valid"),
        *[({"cursor": c}, 422, "cursor is not valid") for c in BAD_CURSORS],
    ],
)
async def test_bad_limits_and_cursors_are_a_4xx_in_one_shape(
    client: Client,
    db: Database,
    course_id: int,
    query: dict[str, str],
    status: int,
    message: str,
) -> None:
    _, urls = await _every_list(db, course_id)
    for url, params in urls.items():
        response = await client.get(url, params=params | query, headers=ALICE)
        assert response.status_code == status, (url, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_request", url
        assert error["message"] == message, url
        assert set(error) == {"code", "message", "details"}


async def test_a_cursor_of_one_list_is_refused_by_another(
    client: Client, db: Database, course_id: int
) -> None:
    [(_, session), _] = await add_sessions(db, "alice", course_id, [T0, T0])
    await add_messages(db, session, 3)
    topic = await client.get("/v1/courses/test-course/topics?limit=1", headers=ALICE)
    message = await client.get(f"/v1/sessions/{session}/messages?limit=1", headers=ALICE)
    sess = await client.get("/v1/sessions?course_key=test-course&limit=1", headers=ALICE)
    cases = [
        ("/v1/courses/test-course/topics", {}, message.json()["next_cursor"]),
        (f"/v1/sessions/{session}/messages", {}, sess.json()["next_cursor"]),
        ("/v1/sessions", {"course_key": "test-course"}, topic.json()["next_cursor"]),
    ]
    for url, params, cursor in cases:
        assert cursor is not None
        response = await client.get(url, params=params | {"cursor": cursor}, headers=ALICE)
        assert response.status_code == 422, url
        assert response.json()["error"]["message"] == "cursor is not valid"


def test_cursors_round_trip() -> None:
    sid = uuid.uuid4()
    at = datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    cursor = history.encode_cursor(history.SessionKey(at, sid))
    assert base64.urlsafe_b64decode(cursor + "==") == msgspec.json.encode(["s", at, sid])
    assert history.decode_cursor(cursor, history.SessionKey) == history.SessionKey(at, sid)


@pytest.mark.parametrize(
    ("query", "params", "index"),
    [
        (
            history.SESSIONS_AFTER_SQL,
            {"user_id": "alice", "course_id": 1, "updated_at": T0, "id": uuid.uuid4()},
            "chat_sessions_user_course_idx",
        ),
        (
            history.MESSAGES_AFTER_SQL,
            {"session_id": uuid.uuid4(), "id": 10},
            "chat_messages_session_idx",
        ),
        (
            history.TOPICS_AFTER_SQL,
            {"course_id": 1, "module_number": 1, "position": 2},
            "topics_course_order_key",
        ),
    ],
)
async def test_each_page_is_a_range_scan_of_its_index_without_a_sort(
    db: Database, query: str, params: dict[str, Any], index: str
) -> None:
    # The tables are tiny here: forbid sequential scans to see what the index can serve.
    async with db.transaction() as conn:
        await conn.execute("SET LOCAL enable_seqscan = off")
        cur = await conn.execute("EXPLAIN " + query, params | {"limit": 21})
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert index in plan, plan
    assert "Sort" not in plan, plan


async def test_an_empty_cursor_is_the_first_page_as_the_schema_says(
    client: Client, db: Database, course_id: int
) -> None:
    session, urls = await _every_list(db, course_id)
    schema = (await client.get("/schema/openapi.json")).json()
    for url, params in urls.items():
        first = await client.get(url, params=params | {"limit": "2"}, headers=ALICE)
        empty = await client.get(url, params=params | {"limit": "2", "cursor": ""}, headers=ALICE)
        assert first.status_code == empty.status_code == 200, (url, empty.text)
        assert empty.json() == first.json(), url
        path = url.replace(str(session), "{session_id}").replace("test-course", "{course_key}")
        parameters = {p["name"]: p for p in schema["paths"][path]["get"]["parameters"]}
        limit, cursor = parameters["limit"], parameters["cursor"]
        assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 100), path
        assert "empty: the first page" in cursor["description"], path


async def test_options_of_a_job_lists_every_method(client: Client) -> None:
    response = await client.options(f"/v1/jobs/{uuid.uuid4()}", headers=ALICE)
    assert response.status_code == 204
    assert response.headers["allow"] == "DELETE, GET, OPTIONS"
