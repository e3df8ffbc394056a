"""Course isolation: a passage planted in one course never reaches another course's answer.

Course B holds a distinctive planted passage written to be the nearest chunk
to :data:`QUESTION` among *all* chunks of both courses. Asked in course A, the
same question must not retrieve it, cite it, quote it or be answered from B's
semantic cache entry; asked in course B it must be retrieved and quoted, which
proves the plant is findable and that the assertions about A are not vacuous.
Remove the ``course_id`` filter from ``rag/answering/search.py``'s ``SEARCH_SQL`` (or
from ``rag/answering/semantic_cache.py``'s ``LOOKUP_SQL``) and these tests fail.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from arq.connections import ArqRedis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.answering.search import search_chunks
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.redis import create_pool
from rag.platform.resources import Resources, open_resources
from tests.fixtures.services import make_settings
from tests.fixtures.sse import parse_sse
from tests.fixtures.worker import drain_queue
from tests.rag.test_indexing import TOPICS

Client = AsyncTestClient[Litestar]

PLANT = "PLUM-42"
QUESTION = "What is the secret password for the bakery vault?"
PLANTED_BODY = (
    f"The secret password for the bakery vault is {PLANT}.\n\n"
    "What is the secret password for the bakery vault? Only the head baker knows the "
    f"secret password for the bakery vault, and it is {PLANT}."
)


def _course_file(root: Path, key: str, topics: list[tuple[str, str, str]]) -> Path:
    """A JSON course source; ``topics`` are (key, title, body), one module, in order."""
    path = root / f"{key}.json"
    path.write_text(
        json.dumps(
            {
                "key": key,
                "title": f"Course {key}",
                "topics": [
                    {"key": tkey, "module": 1, "position": n, "title": title, "body": body}
                    for n, (tkey, title, body) in enumerate(topics, start=1)
                ],
            }
        )
    )
    return path


def _bread_topics() -> list[tuple[str, str, str]]:
    return [(f"t-{stem}", title, body) for stem, (_, _, title, body) in TOPICS.items()]


class Courses(msgspec.Struct):
    a: int
    b: int


class _Chunk(msgspec.Struct):
    id: int
    course_id: int
    text: str


@pytest.fixture
async def setup(
    database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Resources, Courses]]:
    settings = make_settings(DEV_IDENTITY_HEADER="true", DEV_AUTO_ENROLL="true")
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        bread = _bread_topics()
        # Same number of topics, so both courses end on the same content_version: the
        # semantic cache is then kept apart by course_id alone.
        sources = {
            "course-a": bread,
            "course-b": [*bread[:2], ("vault", "The bakery vault", PLANTED_BODY)],
        }
        for key, topics in sources.items():
            await import_course(res.db, load_course(_course_file(tmp_path, key, topics)))
            await reindex_course(res.db, res.embedding_cache(), settings, key)
        a = await res.db.fetch_value("SELECT id FROM courses WHERE course_key = 'course-a'")
        b = await res.db.fetch_value("SELECT id FROM courses WHERE course_key = 'course-b'")
        versions = await res.db.fetch_value(
            "SELECT count(DISTINCT content_version) FROM courses WHERE id IN (%s, %s)", (a, b)
        )
        assert versions == 1
        yield res, Courses(a, b)


@pytest.fixture
async def client(
    setup: tuple[Resources, Courses], database_url: str, redis_url: str
) -> AsyncIterator[Client]:
    res, _ = setup
    app = create_app(res.settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


async def _ask(
    res: Resources, client: Client, redis_url: str, course_key: str, user: str
) -> dict[str, Any]:
    """Ask :data:`QUESTION` through the API, run the worker, return the job and its events."""
    headers = {"X-User-Id": user}
    asked = await client.post(
        f"/v1/courses/{course_key}/questions", json={"question": QUESTION}, headers=headers
    )
    assert asked.status_code == 202, asked.text
    job_id = asked.json()["job_id"]
    redis = ArqRedis(create_pool(res.settings, redis_url))
    try:
        await drain_queue(res, redis)
    finally:
        await redis.aclose(close_connection_pool=True)
    job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
    assert job["status"] == "succeeded", job
    events = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    job["events_text"] = events.text
    job["events"] = parse_sse(events.text)
    return job


async def _chunks(res: Resources) -> list[_Chunk]:
    return await res.db.fetch_all(_Chunk, "SELECT id, course_id, text FROM course_chunks")


def _cited_chunk_ids(job: dict[str, Any]) -> set[int]:
    cited = {int(c["chunk_id"]) for c in job["citations"]}
    for message in job["events"]:
        if message.event in ("citations", "done"):
            cited |= {int(c["chunk_id"]) for c in message.data["citations"]}
    return cited


async def test_a_planted_passage_in_one_course_never_reaches_another(
    setup: tuple[Resources, Courses], client: Client, redis_url: str
) -> None:
    res, course = setup
    chunks = await _chunks(res)
    planted = {c.id for c in chunks if PLANT in c.text}
    a_chunks = {c.id for c in chunks if c.course_id == course.a}
    assert planted and not planted & a_chunks

    # Without the course filter the plant would be the nearest chunk of all:
    # the question is written to match it, not anything in course A.
    vector = (await res.embedding_cache().embed([QUESTION]))[0]
    nearest = await res.db.fetch_value(
        "SELECT id FROM course_chunks ORDER BY embedding <=> %s LIMIT 1", (vector,)
    )
    assert nearest in planted

    # Retrieval scoped to A, even asking for every chunk there is, never yields B's rows.
    retrieved = await search_chunks(res.db, course.a, vector, k=len(chunks), ef_search=400)
    assert {c.id for c in retrieved} == a_chunks
    assert not any(PLANT in c.text for c in retrieved)

    in_a = await _ask(res, client, redis_url, "course-a", "mallory")
    assert in_a["cached"] is False
    # Course A does not cover it (RELEVANCE_FLOOR): no citation, and none of B's.
    assert _cited_chunk_ids(in_a) <= a_chunks
    assert PLANT not in in_a["answer"]
    assert PLANT not in in_a["events_text"]
    assert "vault" not in json.dumps(in_a["citations"]).lower()

    # The same question in course B retrieves, cites and quotes the plant.
    in_b = await _ask(res, client, redis_url, "course-b", "bob")
    assert _cited_chunk_ids(in_b) & planted
    assert PLANT in in_b["answer"]


async def test_an_answer_cached_for_one_course_is_not_served_in_another(
    setup: tuple[Resources, Courses], client: Client, redis_url: str
) -> None:
    res, course = setup
    in_b = await _ask(res, client, redis_url, "course-b", "bob")
    assert in_b["cached"] is False and PLANT in in_b["answer"]
    cached_for_b = await res.db.fetch_value(
        "SELECT count(*) FROM semantic_cache WHERE course_id = %s", (course.b,)
    )
    assert cached_for_b == 1

    # The identical question in course A, same content_version, same embedder: a miss.
    in_a = await _ask(res, client, redis_url, "course-a", "mallory")
    assert in_a["cached"] is False
    assert PLANT not in in_a["answer"] and PLANT not in in_a["events_text"]
    done = [m for m in in_a["events"] if m.event == "done"]
    assert done and done[-1].data["cached"] is False
    a_entries = await res.db.fetch_all(
        _Chunk,
        "SELECT id, course_id, answer AS text FROM semantic_cache WHERE course_id = %s",
        (course.a,),
    )
    assert len(a_entries) == 1 and PLANT not in a_entries[0].text

    # Control: in course B the cache does serve the identical question.
    again = await _ask(res, client, redis_url, "course-b", "carol")
    assert again["cached"] is True and PLANT in again["answer"]
