from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from arq.connections import ArqRedis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.platform.db import Database
from rag.platform.redis import create_pool
from rag.platform.settings import Settings
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import TOPICS, write_course

Client = AsyncTestClient[Litestar]

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}


@pytest.fixture
def api_settings() -> Settings:
    return make_settings(DEV_IDENTITY_HEADER="true")


@pytest.fixture
async def client(
    api_settings: Settings, db: Database, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[Client]:
    await import_course(db, load_course(write_course(tmp_path / "c", TOPICS)))
    await db.execute(
        "INSERT INTO enrollments (user_id, course_id)"
        " SELECT u, id FROM courses, unnest(%s::text[]) u",
        (["alice", "bob"],),
    )
    app = create_app(api_settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.fixture
async def arq(api_settings: Settings, redis_url: str) -> AsyncIterator[ArqRedis]:
    redis = ArqRedis(create_pool(api_settings, redis_url))
    yield redis
    await redis.aclose(close_connection_pool=True)


URL = "/v1/courses/test-course/questions"


async def test_asking_writes_the_job_then_enqueues_it(
    client: Client,
    db: Database,
    arq: ArqRedis,
) -> None:
    response = await client.post(
        URL,
        json={"question": "  What is bulk fermentation? "},
        headers={**ALICE, "X-Request-ID": "req-42"},
    )
    assert response.status_code == 202, response.text
    assert response.headers["x-request-id"] == "req-42"
    body = response.json()
    job_id = body["job_id"]
    assert body["status"] == "queued"
    assert body["status_url"] == f"/v1/jobs/{job_id}"
    assert body["events_url"].startswith(f"/v1/jobs/{job_id}/events?token=")
    row = await db.fetch_value(
        "SELECT row(status, question, user_id, session_id::text) FROM assistant_jobs"
    )
    assert row == ("queued", "What is bulk fermentation?", "alice", body["session_id"])
    queued = await arq.queued_jobs()
    assert [(j.function, j.job_id, j.args) for j in queued] == [
        # The worker logs with both ids; no trace context while tracing is off.
        ("answer_question", job_id, (job_id, "req-42", {}))
    ]
    # The owner reads it; anyone else gets the same 404 as for a missing job.
    mine = await client.get(f"/v1/jobs/{job_id}", headers=ALICE)
    assert mine.status_code == 200
    assert mine.json()["status"] == "queued" and mine.json()["answer"] is None
    theirs = await client.get(f"/v1/jobs/{job_id}", headers=BOB)
    missing = await client.get(f"/v1/jobs/{uuid.uuid4()}", headers=BOB)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == "not_found"


async def test_an_idempotency_key_makes_one_job(
    client: Client,
    db: Database,
    arq: ArqRedis,
) -> None:
    headers = {**ALICE, "Idempotency-Key": "abc-123"}
    first = await client.post(URL, json={"question": "Why add salt?"}, headers=headers)
    again = await client.post(URL, json={"question": "Why add salt?"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"]
    assert first.json()["session_id"] == again.json()["session_id"]
    assert await db.fetch_value("SELECT count(*) FROM assistant_jobs") == 1
    assert await db.fetch_value("SELECT count(*) FROM chat_sessions") == 1
    assert len(await arq.queued_jobs()) == 1
    # The same key from another user is another job.
    other = await client.post(
        URL, json={"question": "Why add salt?"}, headers={**BOB, "Idempotency-Key": "abc-123"}
    )
    assert other.json()["job_id"] != first.json()["job_id"]


async def test_an_idempotency_key_sent_again_with_another_question_is_422(
    client: Client, db: Database, arq: ArqRedis
) -> None:
    headers = {**ALICE, "Idempotency-Key": "key-1"}
    first = await client.post(URL, json={"question": "Why add salt?"}, headers=headers)
    assert first.status_code == 202
    for body in (
        {"question": "Why add sugar?"},
        {"question": "Why add salt?", "session_id": str(uuid.uuid4())},
    ):
        reused = await client.post(URL, json=body, headers=headers)
        assert reused.status_code == 422, reused.text
        error = reused.json()["error"]
        assert error["code"] == "idempotency_key_reused"
        assert "already used for a different question" in error["message"]
    # The same request again is still the first job; nothing else was made.
    again = await client.post(URL, json={"question": " Why add salt? "}, headers=headers)
    assert again.status_code == 202 and again.json()["job_id"] == first.json()["job_id"]
    assert await db.fetch_value("SELECT count(*) FROM assistant_jobs") == 1
    assert len(await arq.queued_jobs()) == 1


async def test_a_session_is_reused_only_by_its_owner(
    client: Client,
) -> None:
    first = await client.post(URL, json={"question": "What is autolyse?"}, headers=ALICE)
    session = first.json()["session_id"]
    follow_up = await client.post(
        URL, json={"question": "How long?", "session_id": session}, headers=ALICE
    )
    assert follow_up.status_code == 202 and follow_up.json()["session_id"] == session
    stolen = await client.post(
        URL, json={"question": "How long?", "session_id": session}, headers=BOB
    )
    assert stolen.status_code == 404
    assert stolen.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"question": "   "}, ALICE, 422, "invalid_request"),
        ({"question": "x" * 4001}, ALICE, 422, "invalid_request"),
        ({"question": "nul\x00byte"}, ALICE, 422, "invalid_request"),
        ({"question": "bell\x07"}, ALICE, 422, "invalid_request"),
        ({"question": "ok", "extra": 1}, ALICE, 400, "invalid_request"),
        ({"question": 42}, ALICE, 400, "invalid_request"),
        ({}, ALICE, 400, "invalid_request"),
        ({"question": "ok", "session_id": "not-a-uuid"}, ALICE, 400, "invalid_request"),
        ({"question": "ok"}, {}, 401, "unauthorized"),
        ({"question": "ok"}, {"X-User-Id": "bad id!"}, 401, "unauthorized"),
        ({"question": "ok"}, {**ALICE, "Idempotency-Key": "has space"}, 422, "invalid_request"),
    ],
)
async def test_bad_input_is_a_4xx_in_one_shape_and_nothing_is_queued(
    client: Client,
    db: Database,
    arq: ArqRedis,
    body: dict[str, object],
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    response = await client.post(URL, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert await db.fetch_value("SELECT count(*) FROM assistant_jobs") == 0
    assert await arq.queued_jobs() == []


async def test_unknown_course_and_malformed_job_id(
    client: Client,
) -> None:
    unknown = await client.post(
        "/v1/courses/nope/questions", json={"question": "hi"}, headers=ALICE
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    malformed = await client.get("/v1/jobs/not-a-uuid", headers=ALICE)
    assert 400 <= malformed.status_code < 500
    assert set(malformed.json()["error"]) == {"code", "message", "details"}


async def test_identity_is_required_unless_the_development_header_is_on(
    settings: Settings, database_url: str, redis_url: str
) -> None:
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        response = await client.post(URL, json={"question": "hi"}, headers=ALICE)
    assert response.status_code == 401
    assert response.json()["error"]["message"].startswith("authentication is required")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_course_deleted_behind_the_cache_answers_404(
    client: Client, db: Database, arq: ArqRedis
) -> None:
    first = await client.post(URL, json={"question": "What is bulk?"}, headers=ALICE)
    assert first.status_code == 202  # the course key is now cached
    await db.execute("DELETE FROM courses")
    gone = await client.post(URL, json={"question": "What is bulk?"}, headers=ALICE)
    assert gone.status_code == 404, gone.text
    assert gone.json()["error"] == {
        "code": "not_found",
        "message": "no course 'test-course'",
        "details": {},
    }
    assert len(await arq.queued_jobs()) == 1


async def test_a_full_redis_is_a_503_and_the_job_row_says_queued(
    client: Client, db: Database, redis_url: str
) -> None:
    """noeviction: a full Redis refuses the enqueue; the client is told to retry."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_set("maxmemory", "1")
        full = await client.post(URL, json={"question": "What is bulk?"}, headers=ALICE)
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
    assert full.status_code == 503, full.text
    assert full.json()["error"] == {
        "code": "redis_unavailable",
        "message": "the queue is unavailable; try again shortly",
        "details": {},
    }
    assert full.headers["retry-after"]
    # The durable row exists: the reconciler enqueues it once Redis has room.
    assert await db.fetch_value("SELECT status FROM assistant_jobs") == "queued"


def test_the_job_view_takes_each_field_from_the_job_by_name() -> None:
    from typing import get_args

    from api.questions import _JOB_FIELDS, JobView
    from rag.answering.jobs import FINISHED, Job, JobStatus, Status

    job_fields = {f.name for f in msgspec.structs.fields(Job)}
    assert set(_JOB_FIELDS) <= job_fields
    assert {f.name for f in msgspec.structs.fields(JobView)} == {
        *_JOB_FIELDS,
        "job_id",
        "events_url",
    }
    assert {"succeeded", "failed", "cancelled"} == FINISHED
    # The enum and the schema's literal name the same statuses.
    assert {status.value for status in Status} == set(get_args(JobStatus))
