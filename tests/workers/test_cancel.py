"""Cancelling: a queued job never runs; a running one stops generating and ends cancelled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.answering import answers
from rag.answering.events import EventLog
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.resources import Resources, open_resources
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.sse import parse_sse
from tests.rag.test_indexing import TOPICS, write_course

Client = AsyncTestClient[Litestar]
ALICE = {"X-User-Id": "alice"}
URL = "/v1/courses/test-course/questions"


@pytest.fixture
async def env(
    fake_openai: FakeServer, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Resources, Client]]:
    settings = fake_openai.settings(DEV_IDENTITY_HEADER="true", DEV_AUTO_ENROLL="true")
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
        await reindex_course(res.db, res.embedding_cache(), settings, "test-course")
        app = create_app(settings, database_url=database_url, redis_url=redis_url)
        async with AsyncTestClient(app=app) as client:
            yield res, client


async def test_a_cancelled_queued_job_never_runs(
    env: tuple[Resources, Client], fake_openai: FakeServer
) -> None:
    res, client = env
    asked = (await client.post(URL, json={"question": "What is mixing?"}, headers=ALICE)).json()
    job_id = asked["job_id"]
    cancelled = await client.delete(f"/v1/jobs/{job_id}", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # The queued arq job is delivered anyway; the pipeline refuses to start it.
    assert await answers.answer_question(res, EventLog(res.redis), uuid.UUID(job_id)) == "skipped"
    assert fake_openai.stats()["chat_calls"] == 0
    assert await res.db.fetch_value("SELECT count(*) FROM chat_messages") == 0
    events = parse_sse((await client.get(f"/v1/jobs/{job_id}/events", headers=ALICE)).text)
    assert events[-1].event == "error" and events[-1].data["code"] == "cancelled"
    # Only the owner can cancel; for anyone else the job does not exist.
    other = await client.delete(f"/v1/jobs/{job_id}", headers={"X-User-Id": "bob"})
    assert other.status_code == 404


async def test_a_running_job_stops_generating_and_ends_cancelled(
    env: tuple[Resources, Client], fake_openai: FakeServer
) -> None:
    res, client = env
    fake_openai.configure(token_delay=0.02, answer=" ".join(f"word{i}" for i in range(400)))
    asked = (await client.post(URL, json={"question": "What is mixing?"}, headers=ALICE)).json()
    job_id = uuid.UUID(asked["job_id"])
    log = EventLog(res.redis)
    run = asyncio.create_task(answers.answer_question(res, log, job_id))
    # Wait until tokens flow, then cancel.
    for _ in range(200):
        if any(e.type == "token" for e in await log.read(str(job_id))):
            break
        await asyncio.sleep(0.02)
    cancelled = await client.delete(f"/v1/jobs/{job_id}", headers=ALICE)
    assert cancelled.json()["status"] == "running"  # it stops at its next token batch
    assert await asyncio.wait_for(run, 10) == "cancelled"
    job = (await client.get(f"/v1/jobs/{job_id}", headers=ALICE)).json()
    assert job["status"] == "cancelled" and job["answer"] is None
    assert await res.db.fetch_value("SELECT count(*) FROM chat_messages") == 0
    tokens = [e for e in await log.read(str(job_id)) if e.type == "token"]
    assert 0 < len(tokens) < 400  # stopped well before the end
    last = (await log.read(str(job_id)))[-1]
    assert last.type == "error" and last.data["code"] == "cancelled"
