"""A question end to end: API writes and enqueues, an arq worker answers, SSE replays."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.answering import answers
from rag.answering.events import EventLog
from rag.answering.jobs import Job, create_job
from rag.answering.prompts import anchor
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.errors import ProviderUnavailable
from rag.platform.redis import create_pool
from rag.platform.resources import Resources, open_resources
from rag.platform.settings import Settings
from tests.fixtures.services import make_settings
from tests.fixtures.sse import parse_sse
from tests.fixtures.worker import drain_queue

Client = AsyncTestClient[Litestar]
ALICE = {"X-User-Id": "alice"}


@pytest.fixture
async def setup(
    database_url: str, redis_url: str, demo_course_path: Path
) -> AsyncIterator[tuple[Settings, Resources]]:
    settings = make_settings(DEV_IDENTITY_HEADER="true", DEV_AUTO_ENROLL="true")
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        source = load_course(demo_course_path)
        await import_course(res.db, source)
        await reindex_course(res.db, res.embedding_cache(), settings, source.key)
        yield settings, res


async def _run_worker(res: Resources, redis_url: str) -> None:
    redis = ArqRedis(create_pool(res.settings, redis_url))
    try:
        await drain_queue(res, redis)
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_ask_answer_poll_and_replay_the_stream(
    setup: tuple[Settings, Resources], database_url: str, redis_url: str
) -> None:
    settings, res = setup
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        asked = await client.post(
            "/v1/courses/bread-science/questions",
            json={"question": "Why does my bread come out dense and heavy?"},
            headers=ALICE,
        )
        assert asked.status_code == 202, asked.text
        job_id = asked.json()["job_id"]
        await _run_worker(res, redis_url)
        polled = await client.get(f"/v1/jobs/{job_id}", headers=ALICE)
        job = polled.json()
        assert job["status"] == "succeeded", job
        assert job["answer"].startswith("(Offline provider")
        assert job["citations"] and job["usage"]["completion_tokens"] > 0
        assert any("Troubleshooting" in c["topic_title"] for c in job["citations"])
        events = await client.get(f"/v1/jobs/{job_id}/events", headers=ALICE)
        assert events.status_code == 200
        assert events.headers["content-type"].startswith("text/event-stream")
        assert events.headers["x-accel-buffering"] == "no"
        messages = parse_sse(events.text)
        kinds = [m.event for m in messages]
        assert kinds[0] == "status" and kinds[-1] == "done" and "citations" in kinds
        tokens = "".join(str(m.data["text"]) for m in messages if m.event == "token")
        assert tokens == job["answer"]
        # Resume after the fifth token: exactly the rest, nothing lost or repeated.
        token_ids = [m.id for m in messages if m.event == "token"]
        resumed = await client.get(
            f"/v1/jobs/{job_id}/events", headers={**ALICE, "Last-Event-ID": token_ids[4]}
        )
        rest = parse_sse(resumed.text)
        ids = [m.id for m in messages]
        assert [m.id for m in rest] == ids[ids.index(token_ids[4]) + 1 :]
        bogus = await client.get(
            f"/v1/jobs/{job_id}/events", headers={**ALICE, "Last-Event-ID": "nonsense"}
        )
        assert bogus.status_code == 422
        other = await client.get(f"/v1/jobs/{job_id}/events", headers={"X-User-Id": "bob"})
        assert other.status_code == 404


async def test_tokens_are_published_coalesced_the_first_at_once(
    setup: tuple[Settings, Resources],
) -> None:
    """The first piece goes out alone (the first visible word waits for nothing), the
    rest in events of several pieces: one Redis round trip and one SSE write each,
    not one per word."""
    _, res = setup
    job = await _ask_directly(res, "What is oven spring?")
    stored = str(
        await res.db.fetch_value("SELECT answer FROM assistant_jobs WHERE id = %s", (job.id,))
    )
    events = await EventLog(res.redis).read(str(job.id))
    tokens = [str(e.data["text"]) for e in events if e.type == "token"]
    pieces = re.findall(r"\s*\S+", stored)
    assert "".join(tokens) == stored and len(pieces) > 3 * answers.TOKEN_BATCH
    assert tokens[0] == pieces[0]
    # Full batches after the first (a time-based flush may add one or two).
    assert len(tokens) <= 1 + -(-(len(pieces) - 1) // answers.TOKEN_BATCH) + 2


async def test_a_job_run_twice_stores_one_answer(
    setup: tuple[Settings, Resources], database_url: str, redis_url: str
) -> None:
    _, res = setup
    from rag.answering.jobs import create_job

    course_id = await res.db.fetch_value("SELECT id FROM courses")
    job = await create_job(
        res.db, user_id="alice", course_id=course_id, question="What does salt do to dough?"
    )
    events = EventLog(res.redis)
    assert await answers.answer_question(res, events, job.id) == "succeeded"
    # A redelivery (the worker died after committing, before acknowledging).
    await res.db.execute("UPDATE assistant_jobs SET status = 'running' WHERE id = %s", (job.id,))
    assert await answers.answer_question(res, events, job.id) == "succeeded"
    assert (
        await res.db.fetch_value("SELECT count(*) FROM chat_messages WHERE job_id = %s", (job.id,))
        == 2
    )
    assert (
        await res.db.fetch_value(
            "SELECT message_count FROM chat_sessions WHERE id = %s", (job.session_id,)
        )
        == 2
    )
    status = await res.db.fetch_value("SELECT status FROM assistant_jobs WHERE id = %s", (job.id,))
    assert status == "succeeded"


async def _ask_directly(res: Resources, question: str, session: uuid.UUID | None = None) -> Job:
    course_id = await res.db.fetch_value(
        "SELECT id FROM courses WHERE course_key = 'bread-science'"
    )
    job = await create_job(
        res.db, user_id="alice", course_id=course_id, question=question, session_id=session
    )
    assert await answers.answer_question(res, EventLog(res.redis), job.id) == "succeeded"
    async with res.db.connection() as conn:
        stored = await answers.get_stored(conn, job.id)
    assert stored is not None
    return stored


async def test_an_answer_lists_only_the_sources_it_cites_with_snippets_and_anchors(
    setup: tuple[Settings, Resources],
) -> None:
    _, res = setup
    job = await _ask_directly(res, "How does the poke test tell me the dough is proofed?")
    assert job.answer is not None and job.citations
    named = [int(n) for n in re.findall(r"\[(\d+)\]", job.answer)]
    # Each cited source once, in the order the answer first names it; nothing else.
    assert [c["id"] for c in job.citations] == list(dict.fromkeys(named))
    for citation in job.citations:
        assert citation["topic_key"] and citation["snippet"]
        if citation["heading_path"]:
            assert citation["anchor"] == anchor(citation["heading_path"][-1])
    assert job.citations[0]["topic_key"] == "02-05-proofing-and-the-poke-test"
    # The stream's citations event says the same as the stored job.
    events = await EventLog(res.redis).read(str(job.id))
    listed = [e.data["citations"] for e in events if e.type == "citations"]
    assert listed == [job.citations]


async def test_a_follow_up_is_rewritten_and_retrieves_its_topic(
    setup: tuple[Settings, Resources],
) -> None:
    _, res = setup
    first = await _ask_directly(res, "Why do I need steam in the oven?")
    assert first.standalone_question is None  # a first question stands alone
    follow_up = await _ask_directly(res, "How do I make it at home?", first.session_id)
    assert follow_up.standalone_question == (
        "How do I make it at home? (regarding: Why do I need steam in the oven)"
    )
    assert follow_up.citations
    assert follow_up.citations[0]["topic_key"] == "03-01-oven-spring-and-steam"
    # Asked alone, the same words are about nothing in particular: the rewrite is
    # what kept the conversation's topic.
    alone = await _ask_directly(res, "How do I make it at home?")
    assert alone.standalone_question is None
    assert "03-01-oven-spring-and-steam" not in [c["topic_key"] for c in alone.citations]


async def test_a_second_run_that_fails_after_the_first_stored_leaves_the_job_succeeded(
    setup: tuple[Settings, Resources],
) -> None:
    """At-least-once: two runs of one job at once. The first to finish owns the outcome;
    the other's failure afterwards changes neither the row nor the stream."""
    _, res = setup
    course_id = await res.db.fetch_value(
        "SELECT id FROM courses WHERE course_key = 'bread-science'"
    )
    job = await create_job(
        res.db, user_id="alice", course_id=course_id, question="What is salt for?"
    )
    events = EventLog(res.redis)
    # Run B starts (the row goes running) and is slow at the provider ...
    async with res.db.connection() as conn:
        begun = await answers._begin(conn, job.id, "worker-b")
    assert begun is not None
    run_b = begun[0]
    # ... while run A, a redelivery, answers and stores.
    assert await answers.answer_question(res, events, job.id, worker="worker-a") == "succeeded"
    async with res.db.connection() as conn:
        first = await answers.get_stored(conn, job.id)
    assert first is not None and first.status == "succeeded"
    # Then run B's provider call fails, and B would cancel or store too.
    await answers._fail(res, events, run_b, ProviderUnavailable("the provider is down"))
    await answers._cancelled(res, events, run_b)
    async with res.db.connection() as conn:
        after = await answers.get_stored(conn, job.id)
    assert after is not None
    assert (after.status, after.answer, after.error) == ("succeeded", first.answer, None)
    messages = await res.db.fetch_value(
        "SELECT count(*) FROM chat_messages WHERE job_id = %s AND role = 'assistant'", (job.id,)
    )
    assert messages == 1
    stream = await events.read(str(job.id))
    assert stream[-1].type == "done" and not [e for e in stream if e.type == "error"]


async def test_a_run_begins_with_its_context_and_the_last_turns_oldest_first(
    setup: tuple[Settings, Resources],
) -> None:
    """The start statement also reads the course, the session and its recent turns
    (answers._begin); a job whose answer is stored is not started again."""
    _, res = setup
    first = await _ask_directly(res, "Why do I need steam in the oven?")
    session = first.session_id
    asked = ["How do I make it at home?", "And for how long?", "What about a pizza?"]
    for question in asked:
        await _ask_directly(res, question, session)
    job = await create_job(
        res.db, user_id="alice", course_id=first.course_id, question="Anything else?",
        session_id=session,
    )  # fmt: skip
    async with res.db.connection() as conn:
        begun = await answers._begin(conn, job.id, "worker-x")
        assert begun is not None
        started, context, turns = begun
        # Four questions and answers are stored: the last RECENT_TURNS (6) of them.
        assert len(turns) == answers.RECENT_TURNS
        assert [t.role for t in turns] == ["user", "assistant"] * 3
        assert [t.content for t in turns if t.role == "user"] == asked
        follow_ups = await conn.execute(
            "SELECT question, standalone_question FROM assistant_jobs"
            " WHERE session_id = %s AND standalone_question IS NOT NULL",
            (session,),
        )
        rewritten = dict(await follow_ups.fetchall())
        assert rewritten and set(rewritten) <= set(asked)
        assert {t.content: t.standalone for t in turns if t.role == "user"} == {
            q: rewritten.get(q) for q in asked
        }
        assert all(t.standalone is None for t in turns if t.role == "assistant")
        assert context is not None and context.course_title
        assert (started.id, started.status, started.attempts) == (job.id, "running", 1)
        worker = await conn.execute("SELECT worker FROM assistant_jobs WHERE id = %s", (job.id,))
        assert await worker.fetchone() == ("worker-x",)
        # A row that says running with its answer stored (as after a crash between
        # the two, in an earlier version): not started again, no attempt counted.
        await conn.execute(
            "UPDATE assistant_jobs SET status = 'running' WHERE id = %s", (first.id,)
        )
        assert await answers._begin(conn, first.id, "worker-x") is None
        attempts = await conn.execute(
            "SELECT attempts FROM assistant_jobs WHERE id = %s", (first.id,)
        )
        assert await attempts.fetchone() == (1,)
    # The pipeline then repairs the row from the stored answer.
    assert await answers.answer_question(res, EventLog(res.redis), first.id) == "succeeded"
    async with res.db.connection() as conn:
        repaired = await answers.get_stored(conn, first.id)
    assert repaired is not None
    assert (repaired.status, repaired.answer) == ("succeeded", first.answer)


async def test_a_run_that_stores_second_writes_nothing(
    setup: tuple[Settings, Resources],
) -> None:
    """Two runs of one job answer: the second to store writes no message, no usage,
    no activity and no count (its pipelined transaction is rolled back whole)."""
    _, res = setup
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    job = await create_job(res.db, user_id="alice", course_id=course_id, question="Why salt?")
    async with res.db.connection() as conn:
        begun = await answers._begin(conn, job.id, "worker-b")
    assert begun is not None
    run_b = answers._Run(res, EventLog(res.redis), begun[0], time.perf_counter())
    # Run A, a redelivery, answers and stores while run B is still generating.
    assert await answers.answer_question(res, EventLog(res.redis), job.id) == "succeeded"

    async def written() -> tuple[Any, ...]:
        return tuple(
            [
                await res.db.fetch_value(query, (value,))
                for query, value in (
                    ("SELECT count(*) FROM chat_messages WHERE job_id = %s", job.id),
                    ("SELECT message_count FROM chat_sessions WHERE id = %s", job.session_id),
                    (
                        "SELECT row(sum(jobs), sum(prompt_tokens), sum(completion_tokens))::text"
                        " FROM usage_daily WHERE user_id = %s",
                        "alice",
                    ),
                    (
                        "SELECT count(*) FROM learner_activity_events"
                        " WHERE payload->>'job_id' = %s",
                        str(job.id),
                    ),
                    ("SELECT answer FROM assistant_jobs WHERE id = %s", job.id),
                )
            ]
        )

    before = await written()
    assert before[:2] == (2, 2) and before[3] == 2
    usage = {"prompt_tokens": 11, "completion_tokens": 13}
    stored = await answers._store(run_b, "Run B's answer.", [], usage, answers.Served("generated"))
    assert stored is False
    assert await written() == before
