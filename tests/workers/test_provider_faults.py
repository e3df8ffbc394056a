"""The answer pipeline when the provider fails: a clean failure or a retry before the first
token, never half an answer stored as succeeded (fake server, real openai client)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rag.answering import answers
from rag.answering.events import EventLog
from rag.answering.jobs import create_job
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.resources import Resources, open_resources
from tests.fixtures.fake_openai import FakeServer
from tests.rag.test_indexing import TOPICS, write_course

LONG_ANSWER = " ".join(f"word{i}" for i in range(60))
OpenRes = Callable[..., AbstractAsyncContextManager[Resources]]


@pytest.fixture
async def open_res(
    fake_openai: FakeServer, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[OpenRes]:
    """Resources on the fake server with some settings changed, the test course indexed."""
    indexed = False

    @asynccontextmanager
    async def open_with(**env: str) -> AsyncIterator[Resources]:
        nonlocal indexed
        settings = fake_openai.settings(**env)
        async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
            if not indexed:
                await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
                await reindex_course(res.db, res.embedding_cache(), settings, "test-course")
                fake_openai.reset()
                indexed = True
            yield res

    yield open_with


class _Outcome(msgspec.Struct):
    status: str
    answer: str | None
    error: Any
    messages: int
    cached_answers: int


async def _run(res: Resources, question: str, user: str = "alice") -> tuple[str, uuid.UUID]:
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    job = await create_job(res.db, user_id=user, course_id=course_id, question=question)
    return await answers.answer_question(res, EventLog(res.redis), job.id), job.id


async def _outcome(res: Resources, job_id: uuid.UUID) -> _Outcome:
    row = await res.db.fetch_one(
        _Outcome,
        "SELECT status, answer, error,"
        " (SELECT count(*) FROM chat_messages WHERE job_id = j.id) AS messages,"
        " (SELECT count(*) FROM semantic_cache) AS cached_answers"
        " FROM assistant_jobs j WHERE id = %s",
        (job_id,),
    )
    assert row is not None
    return row


async def _assert_failed_cleanly(res: Resources, job_id: uuid.UUID, reason: str) -> None:
    outcome = await _outcome(res, job_id)
    assert outcome.status == "failed"
    assert outcome.answer is None and outcome.messages == 0 and outcome.cached_answers == 0
    assert outcome.error["code"] == "provider_unavailable"
    assert outcome.error["retryable"] is True
    assert reason in outcome.error["message"]
    events = await EventLog(res.redis).read(str(job_id))
    assert events[-1].type == "error" and events[-1].data == outcome.error
    assert not any(e.type == "done" for e in events)


async def test_a_stream_cut_midway_fails_cleanly(
    open_res: OpenRes, fake_openai: FakeServer
) -> None:
    async with open_res() as res:
        fake_openai.configure(answer=LONG_ANSWER)
        fake_openai.add_faults({"endpoint": "chat", "kind": "cut", "after_pieces": 10})
        status, job_id = await _run(res, "What is oven spring?")
        assert status == "failed"
        await _assert_failed_cleanly(res, job_id, "interrupted after 10 pieces")
        # What streamed before the cut (whole token batches) is a beginning, never the answer.
        tokens = [e for e in await EventLog(res.redis).read(str(job_id)) if e.type == "token"]
        streamed = "".join(str(e.data["text"]) for e in tokens)
        assert streamed and " ".join(LONG_ANSWER.split()[:10]).startswith(streamed)
        assert fake_openai.stats()["chat_calls"] == 1  # text was out: no retry


async def test_a_hang_midway_fails_cleanly(open_res: OpenRes, fake_openai: FakeServer) -> None:
    async with open_res(PROVIDER_STREAM_GAP_TIMEOUT="0.5", PROVIDER_READ_TIMEOUT="10") as res:
        fake_openai.configure(answer=LONG_ANSWER, token_delay=30)
        status, job_id = await _run(res, "What is oven spring?")
        assert status == "failed"
        await _assert_failed_cleanly(res, job_id, "stalled")
        assert fake_openai.stats()["chat_calls"] == 1


async def test_a_hang_before_the_first_token_is_retried(
    open_res: OpenRes, fake_openai: FakeServer
) -> None:
    async with open_res(PROVIDER_FIRST_TOKEN_TIMEOUT="0.5", PROVIDER_READ_TIMEOUT="10") as res:
        fake_openai.configure(answer=LONG_ANSWER)
        fake_openai.add_faults({"endpoint": "chat", "kind": "hang", "seconds": 30})
        status, job_id = await _run(res, "What is oven spring?")
        assert status == "succeeded"
        outcome = await _outcome(res, job_id)
        assert outcome.answer == LONG_ANSWER and outcome.messages == 2
        assert fake_openai.stats()["chat_calls"] == 2


async def test_an_open_breaker_fails_jobs_at_once_without_a_chat_call(
    open_res: OpenRes, fake_openai: FakeServer
) -> None:
    env = {"BREAKER_FAILURES": "2", "PROVIDER_MAX_ATTEMPTS": "3", "BREAKER_OPEN_SECONDS": "60"}
    async with open_res(**env) as res:
        fake_openai.add_faults({"endpoint": "chat", "kind": "status", "status": 503, "times": 99})
        status, first = await _run(res, "What is oven spring?")
        assert status == "failed"
        await _assert_failed_cleanly(res, first, "circuit breaker open")  # after 2 attempts
        assert fake_openai.stats()["chat_calls"] == 2
        for n, question in enumerate(["Why knead?", "What does salt do?", "What is a levain?"]):
            status, job_id = await _run(res, question, user=f"user-{n}")
            assert status == "failed"
            await _assert_failed_cleanly(res, job_id, "circuit breaker open")
        assert fake_openai.stats()["chat_calls"] == 2


async def test_the_learner_sees_our_words_and_the_log_keeps_the_providers(
    open_res: OpenRes, fake_openai: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "You exceeded your quota for organization org-Secret123 (billing@example.com)"
    async with open_res(PROVIDER_MAX_ATTEMPTS="2") as res:
        fake_openai.add_faults(
            {"endpoint": "chat", "kind": "status", "status": 400, "message": secret},
            {"endpoint": "chat", "kind": "status", "status": 503, "message": secret, "times": 2},
        )
        rejected_status, rejected = await _run(res, "What is oven spring?")
        unavailable_status, unavailable = await _run(res, "Why knead?", user="bob")
        assert (rejected_status, unavailable_status) == ("failed", "failed")
        expected = {
            rejected: ("provider_rejected", "OpenAI rejected the chat request (HTTP 400)"),
            unavailable: ("provider_unavailable", "OpenAI chat failed after 2 attempts: HTTP 503"),
        }
        for job_id, (code, message) in expected.items():
            error = (await _outcome(res, job_id)).error
            assert (error["code"], error["message"]) == (code, message)
            events = await EventLog(res.redis).read(str(job_id))
            assert events[-1].type == "error" and events[-1].data == error
    # The operator still finds what the provider said, next to the job id.
    assert f"job {rejected} failed: OpenAI rejected the chat request (HTTP 400): {secret}" in (
        caplog.text
    )
    assert secret in caplog.text.split(f"job {unavailable} failed:")[1]
