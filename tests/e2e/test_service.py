"""The service as it runs in production: ``python -m api`` and ``python -m workers run``
as separate processes, real PostgreSQL and Redis, the fake OpenAI server over HTTP.

Only HTTP and the operators' CLI are used to drive it; the database is read
directly only to check what was stored.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from devtools.embedded import free_port
from devtools.processes import ROOT, Service, running_service
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.processes import DEMO_COURSE_KEY, cli
from tests.fixtures.sse import Message, answer_text, parse_sse, stream_sse

pytestmark = pytest.mark.timeout(180)

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}
ASK = f"/v1/courses/{DEMO_COURSE_KEY}/questions"
LONG_ANSWER = " ".join(f"word{i}" for i in range(120))


@pytest.fixture
async def http(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
        yield client


async def ask(
    http: httpx.AsyncClient, question: str, headers: dict[str, str] = ALICE, **body: Any
) -> dict[str, Any]:
    response = await http.post(ASK, json={"question": question, **body}, headers=headers)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def poll(
    http: httpx.AsyncClient, job_id: str, headers: dict[str, str] = ALICE, within: float = 60
) -> dict[str, Any]:
    """The job once it is finished (succeeded, failed or cancelled)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        response = await http.get(f"/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish within {within}s: {job}")


async def events_to_end(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] = ALICE
) -> list[Message]:
    messages = []
    async for message in stream_sse(http, url, headers):
        messages.append(message)
        if message.event in {"done", "error"}:
            break
    return messages


def assistant_messages(database_url: str, job_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM chat_messages WHERE job_id = %s AND role = 'assistant'",
            (job_id,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_ask_then_poll_until_succeeded(http: httpx.AsyncClient) -> None:
    accepted = await ask(http, "Why does my bread come out dense?")
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    job = await poll(http, accepted["job_id"])
    assert job["status"] == "succeeded", job
    assert job["answer"].startswith("Fake answer to:")
    assert job["citations"] and job["usage"]["completion_tokens"] > 0
    assert job["cached"] is False and job["error"] is None


async def test_sse_dropped_midway_resumes_exactly_with_last_event_id(
    http: httpx.AsyncClient, fake_openai: FakeServer, database_url: str
) -> None:
    await fake_openai.aconfigure(token_delay=0.01, answer=LONG_ANSWER)
    accepted = await ask(http, "How long should dough rise?")
    url = accepted["events_url"]
    first: list[Message] = []
    async for message in stream_sse(http, url, ALICE):
        first.append(message)
        if sum(m.event == "token" for m in first) == 5:
            break  # the connection drops here
    # Resume from the header, then once more from the query parameter.
    second: list[Message] = []
    async for message in stream_sse(http, url, {**ALICE, "Last-Event-ID": first[-1].id}):
        second.append(message)
        if sum(m.event == "token" for m in second) == 5:
            break
    third = await events_to_end(http, f"{url}&last_event_id={second[-1].id}")
    messages = first + second + third
    ids = [m.id for m in messages]
    assert len(ids) == len(set(ids)) and ids == sorted(
        ids, key=lambda i: tuple(map(int, i.split("-")))
    )
    assert messages[-1].event == "done"
    job = await poll(http, accepted["job_id"])
    assert answer_text(messages) == job["answer"] == LONG_ANSWER
    assert assistant_messages(database_url, accepted["job_id"]) == 1
    # A finished job replays its whole stream.
    replay = parse_sse((await http.get(url, headers=ALICE)).text)
    assert [m.id for m in replay] == ids


async def test_the_same_question_again_is_cached_with_no_provider_call(
    http: httpx.AsyncClient, fake_openai: FakeServer
) -> None:
    question = "What does salt do to bread dough?"
    first = await poll(http, (await ask(http, question))["job_id"])
    assert first["status"] == "succeeded" and first["cached"] is False
    await fake_openai.areset()
    again = await ask(http, question)  # a new session: a standalone question
    messages = await events_to_end(http, again["events_url"])
    assert messages[-1].event == "done" and messages[-1].data["cached"] is True
    assert answer_text(messages) == first["answer"]
    assert (await fake_openai.astats())["chat_calls"] == 0


async def test_twenty_identical_concurrent_questions_make_one_chat_call(
    http: httpx.AsyncClient, fake_openai: FakeServer
) -> None:
    await fake_openai.aconfigure(ttft=0.5, token_delay=0.005)
    accepted = await asyncio.gather(
        *(ask(http, "Why do we knead dough?", {"X-User-Id": f"u{i}"}) for i in range(20))
    )
    jobs = await asyncio.gather(
        *(poll(http, a["job_id"], {"X-User-Id": f"u{i}"}) for i, a in enumerate(accepted))
    )
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert len({j["answer"] for j in jobs}) == 1
    assert (await fake_openai.astats())["chat_calls"] == 1


async def test_cancelling_a_running_job(http: httpx.AsyncClient, fake_openai: FakeServer) -> None:
    await fake_openai.aconfigure(token_delay=0.05, answer=LONG_ANSWER)
    accepted = await ask(http, "What is an autolyse?")
    seen: list[Message] = []
    async for message in stream_sse(http, accepted["events_url"], ALICE):
        seen.append(message)
        if message.event == "token":
            cancelled = await http.delete(f"/v1/jobs/{accepted['job_id']}", headers=ALICE)
            assert cancelled.status_code == 200
        if message.event in {"done", "error"}:
            break
    assert seen[-1].event == "error" and seen[-1].data["code"] == "cancelled"
    job = await poll(http, accepted["job_id"])
    assert job["status"] == "cancelled" and job["answer"] is None


async def test_another_users_job_stream_and_session_answer_404(http: httpx.AsyncClient) -> None:
    accepted = await ask(http, "What is a levain?")
    await poll(http, accepted["job_id"])
    for path in (
        f"/v1/jobs/{accepted['job_id']}",
        f"/v1/jobs/{accepted['job_id']}/events",
        f"/v1/sessions/{accepted['session_id']}/messages",
    ):
        theirs = await http.get(path, headers=BOB)
        assert theirs.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"]["code"] == "not_found"
    sessions = (await http.get(f"/v1/sessions?course_key={DEMO_COURSE_KEY}", headers=BOB)).json()
    assert sessions["items"] == []


async def test_sigterm_lets_a_running_answer_finish(
    service: Service, http: httpx.AsyncClient, fake_openai: FakeServer, database_url: str
) -> None:
    await fake_openai.aconfigure(token_delay=0.02, answer=LONG_ANSWER)  # about 2.5 s
    accepted = await ask(http, "Why does crust brown?")
    messages: list[Message] = []
    worker = service.workers[0]
    async for message in stream_sse(http, accepted["events_url"], ALICE):
        messages.append(message)
        if message.event == "token" and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        if message.event in {"done", "error"}:
            break
    assert await asyncio.to_thread(worker.wait, 30) == 0
    assert messages[-1].event == "done"
    assert not any(m.event == "reset" for m in messages)  # finished, not restarted
    job = await poll(http, accepted["job_id"])
    assert job["status"] == "succeeded" and answer_text(messages) == job["answer"]
    assert assistant_messages(database_url, accepted["job_id"]) == 1


@pytest.fixture
def short_grace_service(demo_env: dict[str, str]) -> Any:
    with running_service({**demo_env, "WORKER_SHUTDOWN_GRACE": "1"}, port=free_port()) as running:
        yield running


async def test_sigterm_past_the_grace_period_requeues_and_the_rerun_starts_over(
    short_grace_service: Service, fake_openai: FakeServer, database_url: str
) -> None:
    service = short_grace_service
    await fake_openai.aconfigure(token_delay=0.05, answer=LONG_ANSWER)  # about 6 s
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
        accepted = await ask(http, "Why does crust brown?")
        messages: list[Message] = []
        first = service.workers[0]
        stopped_at = 0.0
        async for message in stream_sse(http, accepted["events_url"], ALICE):
            messages.append(message)
            if message.event == "token" and first.poll() is None and not stopped_at:
                first.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                # Exits after its 1 s grace, the answer unfinished; another worker takes over.
                assert await asyncio.to_thread(first.wait, 15) == 0
                assert time.monotonic() - stopped_at < 10
                service.add_worker()
            if message.event in {"done", "error"}:
                break
        assert messages[-1].event == "done"
        assert [m.event for m in messages].count("reset") == 1
        job = await poll(http, accepted["job_id"])
        assert job["status"] == "succeeded"
        assert answer_text(messages) == job["answer"] == LONG_ANSWER
    assert assistant_messages(database_url, accepted["job_id"]) == 1
    assert (await fake_openai.astats())["chat_calls"] == 2


async def test_an_import_reaches_every_api_process_at_once(
    demo_env: dict[str, str], database_url: str
) -> None:
    """The course-key cache (an hour here) is dropped when the course is re-imported."""
    env = {**demo_env, "COURSE_CACHE_TTL": "3600"}
    with running_service(env, port=free_port()) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
            before = await poll(http, (await ask(http, "What is gluten?"))["job_id"])
            assert before["status"] == "succeeded"
            # The course is deleted and imported again: same key, new id.
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("DELETE FROM courses WHERE course_key = %s", (DEMO_COURSE_KEY,))
            await asyncio.to_thread(cli, env, "import-course", str(ROOT / "courses" / "demo"))
            await asyncio.sleep(0.2)  # the announcement travels through Redis pub/sub
            after = await http.post(ASK, json={"question": "What is gluten?"}, headers=ALICE)
            assert after.status_code == 202, after.text
