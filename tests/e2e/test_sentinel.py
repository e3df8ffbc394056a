"""Redis behind Sentinel: the primary is killed with questions in flight.

A primary, a replica and three sentinels on this machine (``devtools/sentinel.py``);
the API and two workers connect through the sentinels (``REDIS_SENTINELS``). While
questions are queued and streaming, the primary's process is SIGKILLed: the
sentinels promote the replica, every process follows it, the reconciler queues
again what the replica had not received, and every question ends answered exactly
once. The time from the kill to the first question answered again is printed (it
is quoted in ``docs/operations.md``).

Debian's ``redis-sentinel`` (``apt-get install redis-sentinel``; ``.ci/run`` installs
it); without it this test fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import psycopg
import pytest

from devtools.processes import Service
from devtools.sentinel import SentinelCluster, sentinel_binary
from tests.e2e.test_service import ASK
from tests.fixtures.fake_openai import FakeServer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster() -> Iterator[SentinelCluster]:
    if sentinel_binary() is None:
        pytest.fail("redis-sentinel is not installed: `apt-get install redis-sentinel`")
    started = SentinelCluster()
    started.start()
    try:
        yield started
    finally:
        started.stop()


async def test_killing_the_primary_loses_no_question_and_answers_each_once(
    cluster: SentinelCluster,  # before ``start``: the service stops before the sentinels
    start: Callable[..., Service],
    fake_openai: FakeServer,
    database_url: str,
) -> None:
    service = start(
        workers=2,
        REDIS_URL="redis://sentinel/0",
        REDIS_SENTINELS=cluster.sentinels,
        REDIS_SENTINEL_MASTER=cluster.name,
        RECONCILE_INTERVAL="1",
        RECONCILE_QUEUED_AFTER="2",
        RECONCILE_RUNNING_AFTER="20",
        WORKER_HEARTBEAT_TTL="3",
    )
    assert cluster.primary() == ("127.0.0.1", cluster.primary_port)
    await fake_openai.aconfigure(ttft=0.1, token_delay=0.02, answer="Knead, rest, shape. " * 8)
    users = [{"X-User-Id": f"learner-{i}"} for i in range(30)]
    job_ids: list[tuple[str, dict[str, str]]] = []
    accepted_at: dict[int, float] = {}

    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:

        async def ask(i: int) -> None:
            # A learner's client retries a refused POST (503 while Redis fails over)
            # with the same Idempotency-Key: one job, whatever happens.
            body = {"question": f"Question {i} about proofing and shaping?"}
            headers = {**users[i], "Idempotency-Key": f"q-{i}"}
            for _ in range(60):
                response = await http.post(ASK, json=body, headers=headers)
                if response.status_code == 202:
                    job_ids.append((response.json()["job_id"], users[i]))
                    accepted_at[i] = time.monotonic()
                    return
                assert response.status_code in (503, 429), response.text
                await asyncio.sleep(0.25)
            raise AssertionError(f"question {i} was never accepted")

        await asyncio.gather(*(ask(i) for i in range(15)))
        await asyncio.sleep(0.3)  # some answering, some still queued
        killed, killed_at = time.monotonic(), datetime.now(UTC)
        cluster.kill_primary()
        await asyncio.gather(*(ask(i) for i in range(15, 30)))

        # Every question ends answered.
        finished: list[datetime] = []
        deadline = time.monotonic() + 120
        pending = dict(job_ids)
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} questions never finished"
            for job_id, who in list(pending.items()):
                response = await http.get(f"/v1/jobs/{job_id}", headers=who)
                if response.status_code != 200:
                    continue  # the API may answer 503 while Redis fails over
                job = response.json()
                if job["status"] == "succeeded":
                    del pending[job_id]
                    finished.append(datetime.fromisoformat(job["finished_at"]))
                assert job["status"] in ("queued", "running", "succeeded"), job
            await asyncio.sleep(0.2)

    assert cluster.primary() == ("127.0.0.1", cluster.replica_port)  # failed over
    assert len(job_ids) == 30
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT job_id, count(*) FROM chat_messages WHERE role = 'assistant'"
            " GROUP BY job_id"
        ).fetchall()
        jobs = conn.execute("SELECT count(*) FROM assistant_jobs").fetchone()
    assert jobs == (30,)
    assert len(stored) == 30 and {count for _, count in stored} == {1}
    # What an operator sees: questions accepted again, and answers stored again.
    accepting = min(accepted_at[i] for i in range(15, 30)) - killed
    answering = (min(t for t in finished if t > killed_at) - killed_at).total_seconds()
    print(
        f"\nafter the primary was killed: questions accepted again in {accepting:.1f} s, "
        f"the first answer stored in {answering:.1f} s, all 30 answered once"
    )
