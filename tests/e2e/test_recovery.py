"""Provider protection and zero loss, on the service as real processes: the circuit
breaker in a 429 storm, broken and stalled streams, a worker killed with SIGKILL
mid-answer, and a Redis flushed with questions queued.

Only HTTP drives the service; Redis and the database are read (and Redis flushed)
directly, as an operator or an outage would.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.processes import Service
from rag.answering.events import EventLog
from rag.protection.breaker import BreakerStatus, CircuitBreaker
from tests.e2e.test_service import (
    ALICE,
    LONG_ANSWER,
    ask,
    assistant_messages,
    events_to_end,
    poll,
)
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.sse import Message, answer_text, stream_sse

pytestmark = pytest.mark.timeout(180)

#: Fast recovery for tests: the reconciler every second, jobs overdue after 1-2 s.
FAST_RECONCILER = {
    "RECONCILE_INTERVAL": "1",
    "RECONCILE_QUEUED_AFTER": "1",
    "RECONCILE_RUNNING_AFTER": "2",
}


@pytest.fixture
def redis(redis_client: aioredis.Redis) -> aioredis.Redis:
    return redis_client


def client(service: Service) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=service.base_url, timeout=30)


async def chat_breaker(redis: aioredis.Redis) -> BreakerStatus:
    # The same name the workers use (rag/providers/openai.py): operation and model.
    breaker = CircuitBreaker(
        redis, "openai:chat:gpt-4o-mini", failures=3, window=30, open_for=1, probe_lease=1
    )
    return await breaker.status()


async def test_a_429_storm_opens_the_breaker_and_the_service_recovers(
    start: Any, fake_openai: FakeServer, redis: aioredis.Redis, database_url: str
) -> None:
    service = start(
        BREAKER_FAILURES="3",
        BREAKER_OPEN_SECONDS="5",
        PROVIDER_MAX_ATTEMPTS="4",
        PROVIDER_RETRY_MAX_WAIT="0.2",
    )
    await fake_openai.aadd_faults(
        {"endpoint": "chat", "kind": "status", "status": 429, "retry_after": 0.1, "times": 1000}
    )
    async with client(service) as http:
        # The first job's retries open the breaker: three calls, the fourth never sent.
        first = await poll(http, (await ask(http, "Why does my bread come out dense?"))["job_id"])
        assert first["status"] == "failed"
        assert first["error"]["code"] == "provider_unavailable"
        assert first["error"]["retryable"] is True
        assert (await fake_openai.astats())["chat_calls"] == 3
        assert (await chat_breaker(redis)).state == "open"
        # While it is open, every job fails at once, with no call to the provider.
        questions = ["What is gluten?", "What does salt do?", "Why knead?", "What is a levain?"]
        accepted = await asyncio.gather(*(ask(http, q) for q in questions))
        jobs = await asyncio.gather(*(poll(http, a["job_id"]) for a in accepted))
        for job in jobs:
            assert job["status"] == "failed" and job["answer"] is None
            assert job["error"]["code"] == "provider_unavailable"
            assert job["error"]["retryable"] is True
            assert "circuit breaker open" in job["error"]["message"]
        messages = await events_to_end(http, accepted[0]["events_url"])
        assert messages[-1].event == "error"
        assert messages[-1].data["code"] == "provider_unavailable"
        assert messages[-1].data["retryable"] is True
        assert (await fake_openai.astats())["chat_calls"] == 3
        for a in accepted:
            assert assistant_messages(database_url, a["job_id"]) == 0
        # The provider recovers; after the open period one probe closes the breaker.
        await fake_openai.areset()
        deadline = time.monotonic() + 30
        while (await chat_breaker(redis)).state == "open":
            assert time.monotonic() < deadline, "the breaker never half-opened"
            await asyncio.sleep(0.2)
        again = await poll(http, (await ask(http, "How long should dough rise?"))["job_id"])
        assert again["status"] == "succeeded", again
        assert (await chat_breaker(redis)).state == "closed"
        later = await poll(http, (await ask(http, "What is oven spring?"))["job_id"])
        assert later["status"] == "succeeded"
    assert (await fake_openai.astats())["chat_calls"] == 2


async def test_a_stream_cut_midway_fails_the_job_cleanly(
    start: Any, fake_openai: FakeServer, database_url: str
) -> None:
    service = start()
    await fake_openai.aconfigure(answer=LONG_ANSWER)
    await fake_openai.aadd_faults({"endpoint": "chat", "kind": "cut", "after_pieces": 20})
    async with client(service) as http:
        accepted = await ask(http, "Why does crust brown?")
        messages = await events_to_end(http, accepted["events_url"])
        job = await poll(http, accepted["job_id"])
    assert any(m.event == "token" for m in messages)
    _assert_failed_cleanly(messages, job, database_url, "interrupted after 20 pieces")
    assert (await fake_openai.astats())["chat_calls"] == 1  # text was out: no retry


def _assert_failed_cleanly(
    messages: list[Message], job: dict[str, Any], database_url: str, reason: str
) -> None:
    """The stream ends with a retryable ``provider_unavailable`` error, the job failed
    for ``reason`` with no answer, and no assistant message was stored."""
    assert messages[-1].event == "error"
    assert messages[-1].data["code"] == "provider_unavailable"
    assert messages[-1].data["retryable"] is True
    assert job["status"] == "failed" and job["answer"] is None
    assert reason in job["error"]["message"]
    assert assistant_messages(database_url, job["job_id"]) == 0


async def test_a_stream_that_stalls_midway_fails_the_job_cleanly(
    start: Any, fake_openai: FakeServer, database_url: str
) -> None:
    service = start(PROVIDER_STREAM_GAP_TIMEOUT="1")
    await fake_openai.aconfigure(answer=LONG_ANSWER, token_delay=30)  # one piece, then silence
    async with client(service) as http:
        accepted = await ask(http, "Why does crust brown?")
        messages = await events_to_end(http, accepted["events_url"])
        job = await poll(http, accepted["job_id"])
    _assert_failed_cleanly(messages, job, database_url, "stalled")
    assert (await fake_openai.astats())["chat_calls"] == 1


async def test_a_worker_killed_mid_answer_is_replaced_and_the_job_completes(
    start: Any, fake_openai: FakeServer, database_url: str
) -> None:
    service = start(**FAST_RECONCILER)
    await fake_openai.aconfigure(token_delay=0.05, answer=LONG_ANSWER)  # about 6 s
    async with client(service) as http:
        accepted = await ask(http, "Why does crust brown?")
        messages: list[Message] = []
        victim = service.workers[0]
        async for message in stream_sse(http, accepted["events_url"], ALICE):
            messages.append(message)
            if message.event == "token" and victim.poll() is None:
                victim.send_signal(signal.SIGKILL)
                assert await asyncio.to_thread(victim.wait, 15) == -signal.SIGKILL
                # Its job stays `running` and in arq under the dead worker's marker
                # (which arq would honour for an hour); the new worker's reconciler
                # frees it once it is RECONCILE_RUNNING_AFTER old.
                service.add_worker()
            if message.event in {"done", "error"}:
                break
        job = await poll(http, accepted["job_id"])
    assert messages[-1].event == "done", messages[-1]
    assert [m.event for m in messages].count("reset") == 1
    assert job["status"] == "succeeded"
    assert answer_text(messages) == job["answer"] == LONG_ANSWER
    assert assistant_messages(database_url, accepted["job_id"]) == 1
    assert (await fake_openai.astats())["chat_calls"] == 2


async def test_a_killed_worker_is_noticed_by_its_heartbeat_not_by_the_jobs_age(
    start: Any, fake_openai: FakeServer, database_url: str
) -> None:
    """RECONCILE_RUNNING_AFTER at its default (360 s): the rerun comes from the dead
    worker's expired heartbeat (3 s here), within one reconciler pass after it. Before,
    the job's fresh last token kept it "alive" for a whole deadline, then another."""
    service = start(RECONCILE_INTERVAL="1", WORKER_HEARTBEAT_TTL="3")
    await fake_openai.aconfigure(token_delay=0.05, answer=LONG_ANSWER)
    async with client(service) as http:
        accepted = await ask(http, "Why does crust brown?")
        victim = service.workers[0]
        killed_at = reset_at = 0.0
        async for message in stream_sse(http, accepted["events_url"], ALICE):
            if message.event == "token" and victim.poll() is None:
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                assert await asyncio.to_thread(victim.wait, 15) == -signal.SIGKILL
                service.add_worker()
            if message.event == "reset":
                reset_at = time.monotonic()
            if message.event in {"done", "error"}:
                break
        job = await poll(http, accepted["job_id"])
    assert job["status"] == "succeeded" and job["answer"] == LONG_ANSWER
    assert killed_at and reset_at, "the job was never run again"
    # Heartbeat TTL 3 s + one pass (1 s) + the new worker's start-up, with room for a
    # busy machine; the age rule would have taken 360 s.
    assert reset_at - killed_at < 15, reset_at - killed_at
    assert assistant_messages(database_url, accepted["job_id"]) == 1


async def test_questions_queued_when_redis_is_flushed_are_all_answered(
    start: Any, redis: aioredis.Redis, database_url: str
) -> None:
    service = start(workers=0, **FAST_RECONCILER)
    async with client(service) as http:
        questions = [
            "What is gluten?",
            "What does salt do?",
            "Why knead dough?",
            "What is a levain?",
            "Why does crust brown?",
        ]
        accepted = [await ask(http, q, {"X-User-Id": f"user-{i}"}) for i, q in enumerate(questions)]
        assert await redis.zcard("arq:queue") == len(questions)
        await redis.flushall()  # the queue is gone; the rows in PostgreSQL are not
        service.add_worker()
        jobs = await asyncio.gather(
            *(
                poll(http, a["job_id"], {"X-User-Id": f"user-{i}"}, within=90)
                for i, a in enumerate(accepted)
            )
        )
    assert [j["status"] for j in jobs] == ["succeeded"] * len(questions)
    for a in accepted:
        assert assistant_messages(database_url, a["job_id"]) == 1


async def _poll_through_outage(
    http: httpx.AsyncClient, job_id: str, headers: dict[str, str]
) -> dict[str, Any]:
    """Poll like a client would: a 503 (with Retry-After) means try again."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = await http.get(f"/v1/jobs/{job_id}", headers=headers)
        if response.status_code == 503:
            assert response.headers["retry-after"]
        else:
            assert response.status_code == 200, response.text
            job: dict[str, Any] = response.json()
            if job["status"] in {"succeeded", "failed", "cancelled"}:
                return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


async def _answers_after_outage(
    http: httpx.AsyncClient, accepted: list[dict[str, Any]], database_url: str
) -> None:
    jobs = await asyncio.gather(
        *(
            _poll_through_outage(http, a["job_id"], {"X-User-Id": f"user-{i}"})
            for i, a in enumerate(accepted)
        )
    )
    assert [j["status"] for j in jobs] == ["succeeded"] * len(accepted), jobs
    for a in accepted:
        assert assistant_messages(database_url, a["job_id"]) == 1


async def _ask_until_accepted(http: httpx.AsyncClient, question: str) -> dict[str, Any]:
    """Ask, retrying while the API says 503 (what a client does with Retry-After)."""
    for _ in range(100):
        response = await http.post(
            "/v1/courses/bread-science/questions", json={"question": question}, headers=ALICE
        )
        if response.status_code == 202:
            accepted: dict[str, Any] = response.json()
            return accepted
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        await asyncio.sleep(0.2)
    raise AssertionError("the API did not recover")


async def _until_streaming(redis: aioredis.Redis, accepted: list[dict[str, Any]]) -> None:
    """Wait until at least one of the answers is midway: tokens streamed, not done.
    An outage begun before that would test a queue, not a stream."""
    log = EventLog(redis)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for job in accepted:
            events = await log.read(job["job_id"])
            if any(e.type == "token" for e in events) and not any(e.terminal for e in events):
                return
        await asyncio.sleep(0.05)
    raise AssertionError("no answer was streaming within 30 s")


async def test_postgresql_restarted_mid_load_the_service_recovers_by_itself(
    start: Any, fake_openai: FakeServer, pg_server: Any, database_url: str, redis: aioredis.Redis
) -> None:
    service = start(**FAST_RECONCILER)
    await fake_openai.aconfigure(token_delay=0.02, answer=LONG_ANSWER)  # ~2.5 s each
    async with client(service) as http:
        questions = [
            "What is gluten?",
            "What does salt do?",
            "Why knead dough?",
            "What is a levain?",
        ]
        accepted = [await ask(http, q, {"X-User-Id": f"user-{i}"}) for i, q in enumerate(questions)]
        await _until_streaming(redis, accepted)
        await asyncio.to_thread(pg_server.server.stop)
        down = await http.get("/ready")
        assert down.status_code == 503
        await asyncio.sleep(2)
        await asyncio.to_thread(pg_server.server.start)
        # No process was restarted: the pools reconnect, the reconciler reruns what failed.
        await _answers_after_outage(http, accepted, database_url)
        after = await _ask_until_accepted(http, "Why does crust brown?")
        assert (await poll(http, after["job_id"], within=60))["status"] == "succeeded"
        assert (await http.get("/ready")).status_code == 200
    assert all(w.poll() is None for w in service.workers)


async def test_redis_restarted_empty_mid_load_loses_no_question(
    start: Any, fake_openai: FakeServer, redis_server: Any, database_url: str, redis: aioredis.Redis
) -> None:
    """A Redis restart without persistence, answers streaming: queue, streams and
    caches are gone. The worker reconnects (it is not restarted) and the
    reconciler requeues every question from PostgreSQL."""
    service = start(**FAST_RECONCILER)
    await fake_openai.aconfigure(token_delay=0.02, answer=LONG_ANSWER)  # ~2.5 s each
    async with client(service) as http:
        questions = ["What is gluten?", "What does salt do?", "Why knead dough?"]
        accepted = [await ask(http, q, {"X-User-Id": f"user-{i}"}) for i, q in enumerate(questions)]
        await _until_streaming(redis, accepted)  # the first one, the others wait
        await redis.aclose()
        await asyncio.to_thread(redis_server.stop)
        refused = await http.post(
            "/v1/courses/bread-science/questions", json={"question": "Hello?"}, headers=ALICE
        )
        assert refused.status_code == 503 and refused.headers["retry-after"]
        await asyncio.sleep(1)
        await asyncio.to_thread(redis_server.start)
        await _answers_after_outage(http, accepted, database_url)
        after = await _ask_until_accepted(http, "Why does crust brown?")
        assert (await poll(http, after["job_id"], within=60))["status"] == "succeeded"
    assert all(w.poll() is None for w in service.workers)
