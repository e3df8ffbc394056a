"""Running summaries: queued after an answer's ``done``, every N messages, once per step."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from arq.connections import ArqRedis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.answering.queue import QUEUE_NAME
from rag.answering.summaries import update_summary
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.redis import create_pool
from rag.platform.resources import Resources, open_resources
from tests.fixtures.services import make_settings
from tests.fixtures.worker import drain_queue
from workers.jobs import _maybe_enqueue_summary, answer_question, job_context

ALICE = {"X-User-Id": "alice"}


@pytest.fixture
async def env(
    database_url: str, redis_url: str, demo_course_path: Path
) -> AsyncIterator[tuple[Resources, AsyncTestClient[Litestar], ArqRedis]]:
    settings = make_settings(
        DEV_IDENTITY_HEADER="true", DEV_AUTO_ENROLL="true", SUMMARY_EVERY_MESSAGES="4"
    )
    arq = ArqRedis(create_pool(settings, redis_url))
    async with open_resources(settings, database_url=database_url, redis=arq) as res:
        source = load_course(demo_course_path)
        await import_course(res.db, source)
        await reindex_course(res.db, res.embedding_cache(), settings, source.key)
        app = create_app(settings, database_url=database_url, redis_url=redis_url)
        async with AsyncTestClient(app=app) as client:
            yield res, client, arq


async def _drain(res: Resources, arq: ArqRedis) -> None:
    await drain_queue(res, arq)


async def _ask(client: AsyncTestClient[Litestar], question: str, session: str | None) -> str:
    body: dict[str, str] = {"question": question}
    if session:
        body["session_id"] = session
    response = await client.post("/v1/courses/bread-science/questions", json=body, headers=ALICE)
    assert response.status_code == 202, response.text
    return str(response.json()["session_id"])


async def _summary(res: Resources, session: str) -> tuple[str, int]:
    row = await res.db.fetch_value(
        "SELECT row(summary, summary_message_count) FROM chat_sessions WHERE id = %s",
        (session,),
    )
    return str(row[0]), int(row[1])


async def test_the_summary_follows_every_n_messages_off_the_answer_path(
    env: tuple[Resources, AsyncTestClient[Litestar], ArqRedis],
) -> None:
    res, client, arq = env
    session = await _ask(client, "Why does dough need salt?", None)
    await _drain(res, arq)
    assert await _summary(res, session) == ("", 0)  # 2 messages: not due yet
    await _ask(client, "And how much salt, in baker's percentage?", session)
    await _drain(res, arq)  # the answer, then the summary job it queued
    summary, covered = await _summary(res, session)
    assert covered == 4
    assert "Why does dough need salt?" in summary
    assert "how much salt, in baker's percentage?" in summary
    # The answers themselves never waited for it: both jobs succeeded with their own rows.
    statuses = await res.db.fetch_value("SELECT array_agg(status) FROM assistant_jobs")
    assert statuses == ["succeeded", "succeeded"]


async def test_a_summary_step_is_enqueued_once(
    env: tuple[Resources, AsyncTestClient[Litestar], ArqRedis],
) -> None:
    res, client, arq = env
    session = await _ask(client, "What is autolyse?", None)
    await _drain(res, arq)
    await _ask(client, "How long should it last?", session)
    # Run the answer alone, then offer the same summary step twice.
    job_id = str(await res.db.fetch_value("SELECT id FROM assistant_jobs WHERE status = 'queued'"))
    await arq.delete(f"arq:job:{job_id}")
    await arq.zrem(QUEUE_NAME, job_id)
    ctx = {**job_context(res), "redis": arq}
    assert await answer_question(ctx, job_id) == "succeeded"
    await _maybe_enqueue_summary(ctx, uuid.UUID(job_id))
    queued = [j.function for j in await arq.queued_jobs()]
    assert queued == ["update_chat_summary"]
    # A second run changes nothing: the summary already covers every message.
    await _drain(res, arq)
    assert (await _summary(res, session))[1] == 4
    assert await update_summary(res, uuid.UUID(session)) is False
