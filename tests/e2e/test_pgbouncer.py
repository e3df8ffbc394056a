"""The question flow through a real PgBouncer in transaction pooling (``DB_PGBOUNCER=true``).

The API and two workers (pools of up to 8 connections each) reach PostgreSQL through
a PgBouncer with 2 server connections, as production runs it (``compose.yaml``):
more clients than servers, every transaction possibly on another server session.
What could break there does not: prepared statements (off with ``DB_PGBOUNCER``),
per-transaction settings of the HNSW search (``SET LOCAL``), the COPY of an import,
the idempotent job creation, cancellation, the semantic cache.

PgBouncer is Debian's package (``apt-get install pgbouncer``; ``.ci/run`` installs
it); without it these tests fail.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from devtools.pgbouncer import PgBouncer, pgbouncer_binary
from devtools.processes import ROOT, Service
from tests.e2e.test_service import ALICE, ASK, LONG_ANSWER, ask, events_to_end, poll
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.processes import cli
from tests.fixtures.services import PgServer
from tests.fixtures.sse import answer_text

pytestmark = pytest.mark.timeout(180)
POOL_SIZE = 2


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PgServer) -> Iterator[PgBouncer]:
    if pgbouncer_binary() is None:
        pytest.fail("pgbouncer is not installed: `apt-get install pgbouncer`", pytrace=False)
    bouncer = PgBouncer(pg_server.port, pool_size=POOL_SIZE)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def bounced(
    start: Callable[..., Service], database_url: str, pgbouncer: PgBouncer
) -> tuple[Service, str]:
    """The service with its database URL pointing at PgBouncer; the database's name."""
    name = database_url.rsplit("/", 1)[1]
    service = start(
        workers=2, DATABASE_URL=pgbouncer.url(name), DB_PGBOUNCER="true", DB_POOL_MAX="8"
    )
    return service, name


class Sampler:
    """Samples PgBouncer's client and server connections of one database."""

    def __init__(self, bouncer: PgBouncer, database: str) -> None:
        self.bouncer, self.database = bouncer, database
        self.clients: list[int] = []
        self.servers: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # The admin console speaks the simple query protocol only: nothing prepared.
        admin = self.bouncer.url("pgbouncer")
        with psycopg.connect(admin, autocommit=True, prepare_threshold=None) as conn:
            while not self._stop.is_set():
                clients = conn.execute("SHOW CLIENTS").fetchall()
                servers = conn.execute("SHOW SERVERS").fetchall()
                # Column 3 of both is the database.
                self.clients.append(sum(1 for row in clients if row[2] == self.database))
                self.servers.append(sum(1 for row in servers if row[2] == self.database))
                self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def test_questions_are_answered_once_through_transaction_pooling(
    bounced: tuple[Service, str],
    pgbouncer: PgBouncer,
    fake_openai: FakeServer,
    database_url: str,
) -> None:
    service, name = bounced
    await fake_openai.aconfigure(ttft=0.05, token_delay=0.005, answer=LONG_ANSWER)
    users = [{"X-User-Id": f"learner-{i}"} for i in range(24)]
    async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as http:
        with Sampler(pgbouncer, name) as sampler:
            accepted = await asyncio.gather(
                *(ask(http, f"Question {i}: how does {topic} work?", users[i])
                  for i, topic in enumerate(["gluten", "yeast", "salt", "steam"] * 6))
            )  # fmt: skip
            jobs = await asyncio.gather(
                *(poll(http, a["job_id"], users[i], 90) for i, a in enumerate(accepted))
            )
        assert [job["status"] for job in jobs] == ["succeeded"] * 24
        # One streamed to the end through PgBouncer too; a follow-up reads the session.
        streamed = await ask(http, "What does kneading do?")
        messages = await events_to_end(http, streamed["events_url"])
        assert messages[-1].event == "done" and answer_text(messages) == LONG_ANSWER
        follow_up = await ask(http, "And for how long?", session_id=streamed["session_id"])
        assert (await poll(http, follow_up["job_id"]))["standalone_question"]
        # The same question again is served from the semantic cache (HNSW, SET LOCAL).
        again = await ask(http, "What does kneading do?")
        assert (await poll(http, again["job_id"]))["served_by"] == "semantic_cache"
        # An idempotent retry of a POST makes no second job.
        key = {"Idempotency-Key": "bounced-1", **ALICE}
        first = await http.post(ASK, json={"question": "Why rest dough?"}, headers=key)
        second = await http.post(ASK, json={"question": "Why rest dough?"}, headers=key)
        assert first.json()["job_id"] == second.json()["job_id"]
        assert (await poll(http, first.json()["job_id"]))["status"] == "succeeded"

    # More client connections than server connections, and never more servers than the pool.
    assert max(sampler.clients) > POOL_SIZE, sampler.clients
    assert max(sampler.servers) <= POOL_SIZE, sampler.servers
    # Exactly one stored answer per job.
    with psycopg.connect(database_url) as conn:
        per_job = conn.execute(
            "SELECT j.id, count(m.id) FROM assistant_jobs j LEFT JOIN chat_messages m"
            " ON m.job_id = j.id AND m.role = 'assistant' WHERE j.status = 'succeeded'"
            " GROUP BY j.id"
        ).fetchall()
    assert len(per_job) == 28 and {count for _, count in per_job} == {1}


async def test_cancelling_and_importing_through_transaction_pooling(
    bounced: tuple[Service, str], pgbouncer: PgBouncer, fake_openai: FakeServer
) -> None:
    service, name = bounced
    await fake_openai.aconfigure(ttft=0.05, token_delay=0.05, answer=LONG_ANSWER)
    async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as http:
        accepted = await ask(http, "How do I score a loaf?")
        await asyncio.sleep(1.0)
        cancelled = await http.delete(f"/v1/jobs/{accepted['job_id']}", headers=ALICE)
        assert cancelled.status_code == 200
        assert (await poll(http, accepted["job_id"]))["status"] == "cancelled"
    # The operators' import (a COPY, deferred constraints, the reindex) through PgBouncer.
    env = {**service.env, "DATABASE_URL": pgbouncer.url(name), "DB_PGBOUNCER": "true"}
    out = cli(env, "import-course", str(ROOT / "courses" / "networking"))
    assert "topics added" in out
