"""Rate limits and admission control through the API: headers, the error shape,
the queue-depth and in-flight caps, Redis going away and coming back, and
exactness across two API processes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from devtools.embedded import EmbeddedRedis, free_port
from devtools.processes import ROOT, start_api, stop, wait_http
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.platform.db import Database
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.processes import DEMO_COURSE_KEY, cli, service_env
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import TOPICS, write_course

Client = AsyncTestClient[Litestar]

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}
URL = "/v1/courses/test-course/questions"
TOPICS_URL = "/v1/courses/test-course/topics"
#: One a minute: nothing refills while a test runs.
SLOW = "1"


@pytest.fixture
async def course(db: Database, tmp_path: Path) -> None:
    await import_course(db, load_course(write_course(tmp_path / "c", TOPICS)))
    await db.execute(
        "INSERT INTO enrollments (user_id, course_id)"
        " SELECT u, id FROM courses, unnest(%s::text[]) u",
        (["alice", "bob", "carol"],),
    )


@contextlib.asynccontextmanager
async def api(database_url: str, redis_url: str, **env: str) -> AsyncIterator[Client]:
    settings = make_settings(DEV_IDENTITY_HEADER="true", **env)
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    error: dict[str, object] = body["error"]
    return error


def rate_headers(response: httpx.Response) -> tuple[int, int, int]:
    h = response.headers
    return int(h["ratelimit-limit"]), int(h["ratelimit-remaining"]), int(h["ratelimit-reset"])


async def count_jobs(db: Database) -> int:
    return int(await db.fetch_value("SELECT count(*) FROM assistant_jobs"))


# -- rate limits


async def test_a_refused_question_costs_no_question(
    course: None, db: Database, database_url: str, redis_url: str
) -> None:
    """A question refused for its content (422, 400) does not charge the user's budget."""
    async with api(
        database_url, redis_url, RATE_QUESTIONS_PER_MINUTE=SLOW, RATE_QUESTIONS_BURST="2"
    ) as client:
        bad: list[dict[str, object]] = [
            {"json": {"question": ""}},
            {"json": {"question": "\u200b"}},
            {"json": {"question": "x" * 5000}},
            {"json": {"question": "ok"}, "headers": {**ALICE, "Idempotency-Key": "a b"}},
            {"json": {"question": 42}},
        ]
        for kwargs in bad:
            refused = await client.post(URL, **{"headers": ALICE, **kwargs})  # type: ignore[arg-type]
            assert 400 <= refused.status_code < 500 and refused.status_code != 429, refused.text
        for n in range(2):
            ok = await client.post(URL, json={"question": f"Why salt {n}?"}, headers=ALICE)
            assert ok.status_code == 202, ok.text
        over = await client.post(URL, json={"question": "And now?"}, headers=ALICE)
        assert_error(over, 429, "rate_limited")


async def test_questions_over_the_user_limit_are_429_with_headers(
    course: None, db: Database, database_url: str, redis_url: str
) -> None:
    async with api(
        database_url,
        redis_url,
        RATE_QUESTIONS_PER_MINUTE=SLOW,
        RATE_QUESTIONS_BURST="2",
    ) as client:
        first = await client.post(URL, json={"question": "What is a levain?"}, headers=ALICE)
        second = await client.post(URL, json={"question": "Why salt?"}, headers=ALICE)
        third = await client.post(URL, json={"question": "Why steam?"}, headers=ALICE)
        bobs = await client.post(URL, json={"question": "Why steam?"}, headers=BOB)
    assert first.status_code == second.status_code == 202
    assert rate_headers(first)[:2] == (2, 1)
    limit, remaining, reset = rate_headers(second)
    assert (limit, remaining) == (2, 0) and 60 < reset <= 120
    error = assert_error(third, 429, "rate_limited")
    assert error["details"] == {"limit": 2, "per_minute": 1}
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert rate_headers(third)[:2] == (2, 0)
    # Refused before anything was written or queued; another user has their own bucket.
    assert bobs.status_code == 202
    assert await count_jobs(db) == 3


async def test_the_course_limit_counts_every_user_and_charges_nothing_it_refuses(
    course: None, database_url: str, redis_url: str
) -> None:
    async with api(
        database_url,
        redis_url,
        RATE_QUESTIONS_PER_MINUTE=SLOW,
        RATE_QUESTIONS_BURST="5",
        RATE_COURSE_QUESTIONS_PER_MINUTE=SLOW,
        RATE_COURSE_QUESTIONS_BURST="2",
    ) as client:
        alice = await client.post(URL, json={"question": "What is a levain?"}, headers=ALICE)
        bob = await client.post(URL, json={"question": "What is a levain?"}, headers=BOB)
        carol = await client.post(
            URL, json={"question": "What is a levain?"}, headers={"X-User-Id": "carol"}
        )
    assert alice.status_code == bob.status_code == 202
    # The headers describe the bucket closest to running out: the course's.
    assert rate_headers(bob)[:2] == (2, 0)
    assert_error(carol, 429, "rate_limited")
    redis = aioredis.Redis.from_url(redis_url)
    try:
        # Carol's own bucket was left alone: the course refused, so nothing was charged.
        assert await redis.exists("ratelimit:questions:user:carol") == 0
        assert await redis.exists("ratelimit:questions:user:alice") == 1
    finally:
        await redis.aclose()


async def test_reads_share_one_bucket_per_user_across_routes(
    course: None, database_url: str, redis_url: str
) -> None:
    async with api(
        database_url, redis_url, RATE_READS_PER_MINUTE=SLOW, RATE_READS_BURST="3"
    ) as client:
        # Asking is not a read.
        accepted = (await client.post(URL, json={"question": "Why?"}, headers=ALICE)).json()
        topics = await client.get(TOPICS_URL, headers=ALICE)
        job = await client.get(f"/v1/jobs/{accepted['job_id']}", headers=ALICE)
        sessions = await client.get(
            "/v1/sessions", params={"course_key": "test-course"}, headers=ALICE
        )
        events = await client.get(accepted["events_url"])
        messages = await client.get(
            f"/v1/sessions/{accepted['session_id']}/messages", headers=ALICE
        )
        bobs = await client.get(TOPICS_URL, headers=BOB)
        health = await client.get("/health")
    assert [rate_headers(r)[1] for r in (topics, job, sessions)] == [2, 1, 0]
    assert topics.status_code == job.status_code == sessions.status_code == 200
    # The SSE route (identified by its stream token) and the message list: same bucket.
    assert_error(events, 429, "rate_limited")
    assert_error(messages, 429, "rate_limited")
    assert int(events.headers["retry-after"]) >= 1
    assert bobs.status_code == 200 and rate_headers(bobs)[1] == 2
    assert "ratelimit-limit" not in health.headers


async def test_a_rate_of_zero_turns_a_limit_off(
    course: None, database_url: str, redis_url: str
) -> None:
    async with api(database_url, redis_url) as client:  # make_settings: every limit off
        responses = [await client.get(TOPICS_URL, headers=ALICE) for _ in range(5)]
    assert {r.status_code for r in responses} == {200}
    assert all("ratelimit-limit" not in r.headers for r in responses)


# -- admission control


async def test_a_full_queue_answers_503_before_anything_is_written(
    course: None, db: Database, database_url: str, redis_url: str
) -> None:
    async with api(database_url, redis_url, MAX_QUEUE_DEPTH="2") as client:
        for question in ("One?", "Two?"):
            ok = await client.post(URL, json={"question": question}, headers=ALICE)
            assert ok.status_code == 202, ok.text
        full = await client.post(URL, json={"question": "Three?"}, headers=BOB)
    error = assert_error(full, 503, "overloaded")
    assert error["details"] == {"limit": 2}
    assert int(full.headers["retry-after"]) >= 1
    assert await count_jobs(db) == 2


async def test_a_user_at_the_inflight_cap_gets_429_until_a_question_finishes(
    course: None, db: Database, database_url: str, redis_url: str
) -> None:
    async with api(database_url, redis_url, MAX_INFLIGHT_PER_USER="2") as client:
        first = await client.post(
            URL, json={"question": "One?"}, headers={**ALICE, "Idempotency-Key": "k1"}
        )
        second = await client.post(URL, json={"question": "Two?"}, headers=ALICE)
        assert first.status_code == second.status_code == 202
        session = second.json()["session_id"]
        third = await client.post(URL, json={"question": "Three?"}, headers=ALICE)
        follow_up = await client.post(
            URL, json={"question": "And?", "session_id": session}, headers=ALICE
        )
        # A retry of an accepted question is not a new one: same job, not refused.
        retry = await client.post(
            URL, json={"question": "One?"}, headers={**ALICE, "Idempotency-Key": "k1"}
        )
        # Someone else's session is still a 404, cap or not.
        stolen = await client.post(
            URL, json={"question": "And?", "session_id": session}, headers=BOB
        )
        bobs = await client.post(URL, json={"question": "One?"}, headers=BOB)
        await db.execute(
            "UPDATE assistant_jobs SET status = 'succeeded' WHERE id = %s",
            (uuid.UUID(first.json()["job_id"]),),
        )
        after = await client.post(URL, json={"question": "Three?"}, headers=ALICE)
    error = assert_error(third, 429, "too_many_inflight")
    assert error["details"] == {"limit": 2}
    assert int(third.headers["retry-after"]) >= 1
    assert_error(follow_up, 429, "too_many_inflight")
    assert retry.status_code == 202 and retry.json()["job_id"] == first.json()["job_id"]
    assert_error(stolen, 404, "not_found")
    assert bobs.status_code == 202
    assert after.status_code == 202, after.text
    # Refused questions left nothing behind: no job row, no empty session.
    assert await count_jobs(db) == 4
    assert await db.fetch_value("SELECT count(*) FROM chat_sessions") == 4


async def test_the_inflight_count_reads_its_partial_index(db: Database) -> None:
    async with db.connection() as conn:
        # Tiny tables make a sequential scan cheapest; the question is which index.
        await conn.execute("SET enable_seqscan = off")
        cur = await conn.execute(
            "EXPLAIN SELECT 1 FROM assistant_jobs"
            " WHERE user_id = 'alice' AND status IN ('queued', 'running') LIMIT 5"
        )
        plan = "\n".join(row[0] for row in await cur.fetchall())
        await conn.execute("RESET enable_seqscan")
    assert "assistant_jobs_inflight_idx" in plan, plan


# -- Redis unavailable


async def test_redis_down_is_503_with_retry_after_and_recovers_by_itself(
    course: None, database_url: str, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    server.start()
    try:
        async with api(
            database_url, server.url, RATE_READS_PER_MINUTE="600", MAX_QUEUE_DEPTH="100"
        ) as client:
            assert (await client.get(TOPICS_URL, headers=ALICE)).status_code == 200
            server.stop()
            read = await client.get(TOPICS_URL, headers=ALICE)
            ask = await client.post(URL, json={"question": "Why?"}, headers=ALICE)
            for response in (read, ask):
                error = assert_error(response, 503, "redis_unavailable")
                assert error["message"] == "the queue is unavailable; try again shortly"
                assert int(response.headers["retry-after"]) >= 1
            server.start()  # the same port
            for _ in range(50):
                back = await client.get(TOPICS_URL, headers=ALICE)
                if back.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert back.status_code == 200, back.text
            assert rate_headers(back)[0] == 120
            asked = await client.post(URL, json={"question": "Why?"}, headers=ALICE)
            assert asked.status_code == 202, asked.text
    finally:
        server.stop()


# -- two API processes, one limit


@pytest.mark.timeout(180)
async def test_two_api_processes_admit_exactly_the_limit(
    database_url: str, redis_url: str, fake_openai: FakeServer
) -> None:
    limit, attempts = 10, 30
    env = service_env(
        database_url,
        redis_url,
        fake_openai,
        RATE_COURSE_QUESTIONS_PER_MINUTE=SLOW,
        RATE_COURSE_QUESTIONS_BURST=str(limit),
    )
    cli(env, "import-course", str(ROOT / "courses" / "demo"))
    ports = [free_port(), free_port()]
    procs = [start_api({**env, "API_PORT": str(port)}) for port in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_http(f"http://127.0.0.1:{port}/ready", 60, proc)
        async with httpx.AsyncClient(timeout=30) as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        f"http://127.0.0.1:{ports[i % 2]}/v1/courses/{DEMO_COURSE_KEY}/questions",
                        json={"question": "Why does dough rise?"},
                        headers={"X-User-Id": f"learner{i}"},
                    )
                    for i in range(attempts)
                )
            )
    finally:
        stop(procs)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [202] * limit + [429] * (attempts - limit), [r.text for r in responses]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {
        "rate_limited"
    }
