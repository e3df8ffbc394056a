"""Model slots: a bound on concurrent generations per process and across processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rag.answering import answers
from rag.answering.events import EventLog
from rag.answering.jobs import create_job
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.errors import ModelBusy
from rag.platform.redis import Redis, create_redis
from rag.platform.resources import open_resources
from rag.protection.concurrency import ModelSlots
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import TOPICS, write_course


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[Redis]]:
    """Two clients with their own pools: two worker processes, as far as Redis can tell."""
    made = [create_redis(make_settings(), redis_url) for _ in range(2)]
    yield made
    for client in made:
        await client.aclose()


def slots(client: Redis, **kw: float) -> ModelSlots:
    options: dict[str, float] = {
        "per_process": 0,
        "total": 2,
        "lease_seconds": 30,
        "wait_seconds": 10,
        "poll_seconds": 0.01,
    }
    options.update(kw)
    return ModelSlots(
        client,
        per_process=int(options["per_process"]),
        total=int(options["total"]),
        lease_seconds=options["lease_seconds"],
        wait_seconds=options["wait_seconds"],
        poll_seconds=options["poll_seconds"],
    )


async def _peak(bounds: list[ModelSlots], tasks: int, hold: float = 0.1) -> int:
    running = peak = 0

    async def one(bound: ModelSlots) -> None:
        nonlocal running, peak
        async with bound.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(hold)
            running -= 1

    await asyncio.gather(*(one(bounds[i % len(bounds)]) for i in range(tasks)))
    return peak


async def test_the_total_holds_across_processes(clients: list[Redis]) -> None:
    bounds = [slots(c, total=2) for c in clients]
    assert await _peak(bounds, 8) == 2
    assert await bounds[0].in_use() == 0  # every slot given back


async def test_the_per_process_bound(clients: list[Redis]) -> None:
    assert await _peak([slots(clients[0], per_process=1, total=0)], 4) == 1
    assert await _peak([slots(clients[0], per_process=3, total=0)], 6) == 3


async def test_no_slot_within_the_wait_is_a_retryable_error(clients: list[Redis]) -> None:
    first, second = slots(clients[0], total=1), slots(clients[1], total=1, wait_seconds=0.2)
    async with first.slot():
        with pytest.raises(ModelBusy) as raised:
            async with second.slot():
                pass
    assert raised.value.retryable and raised.value.code == "model_busy"
    async with second.slot():  # free again
        pass


async def test_a_crashed_holders_lease_expires(clients: list[Redis]) -> None:
    crashed = slots(clients[0], total=1, lease_seconds=0.3)
    loop = asyncio.get_running_loop()
    assert await crashed._take_shared(loop.time() + 1) is not None  # never given back
    waiting = slots(clients[1], total=1, lease_seconds=0.3, wait_seconds=5)
    started = loop.time()
    async with waiting.slot():
        assert loop.time() - started >= 0.1


async def test_generations_through_the_provider_stay_within_the_total(
    fake_openai: FakeServer, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    fake_openai.configure(ttft=0.2, token_delay=0.01)
    settings = fake_openai.settings(MODEL_CONCURRENCY_TOTAL="2")
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
        await reindex_course(res.db, res.embedding_cache(), settings, "test-course")
        fake_openai.reset()
        fake_openai.configure(ttft=0.2, token_delay=0.01)
        course_id = await res.db.fetch_value("SELECT id FROM courses")
        jobs = [
            await create_job(res.db, user_id=f"u{i}", course_id=course_id, question=f"Q {i}?")
            for i in range(6)
        ]
        events = EventLog(res.redis)
        statuses = await asyncio.gather(
            *(answers.answer_question(res, events, job.id) for job in jobs)
        )
    assert statuses == ["succeeded"] * 6
    stats = fake_openai.stats()
    assert stats["chat_calls"] == 6 and stats["chat_in_flight_max"] == 2
