"""Event streams against the real API process: open streams never starve other routes,
they are capped per user and per process, and a client that stops reading is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from devtools.processes import Service
from rag.answering.events import TOKEN, EventLog
from rag.platform.redis import Redis
from tests.fixtures.processes import DEMO_COURSE_KEY

pytestmark = pytest.mark.timeout(180)

ASK = f"/v1/courses/{DEMO_COURSE_KEY}/questions"


def user(name: str) -> dict[str, str]:
    return {"X-User-Id": name}


async def ask(http: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await http.post(
        ASK, json={"question": f"What is gluten, {name}?"}, headers=user(name)
    )
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


@contextlib.asynccontextmanager
async def idle_stream(
    service: Service, path: str, *, rcvbuf: int | None = None
) -> AsyncIterator[asyncio.StreamReader]:
    """A stream opened by a client that then reads nothing (its request sent, its
    socket kept open). With ``rcvbuf`` the socket's receive buffer is that small."""
    url = urlsplit(service.base_url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_idle_streams_do_not_starve_other_routes(start: Any) -> None:
    """Before the stream hub, each open stream held a pooled Redis connection in a
    blocking read: 40 of them on a pool of 8 made every other route wait 5 s for a
    connection, then answer 503 redis_unavailable."""
    service = start(workers=0, REDIS_MAX_CONNECTIONS="8", SSE_MAX_STREAMS_PER_USER="10")
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
        jobs = [await ask(http, f"idle-{n}") for n in range(4)]  # no worker: they stay queued
        async with contextlib.AsyncExitStack() as streams:
            for job in jobs:
                for _ in range(10):
                    await streams.enter_async_context(idle_stream(service, job["events_url"]))
            await asyncio.sleep(1.5)  # every stream is open and waiting
            began = time.monotonic()
            ready = await http.get("/ready")
            other = await http.post(ASK, json={"question": "Why knead?"}, headers=user("carol"))
            status = await http.get(f"/v1/jobs/{other.json()['job_id']}", headers=user("carol"))
            took = time.monotonic() - began
            assert (ready.status_code, other.status_code, status.status_code) == (200, 202, 200)
            assert took < 2.0, f"three requests took {took:.2f}s beside 40 idle streams"
            # A user at the cap is refused with a 429 the client can act on.
            refused = await http.get(jobs[0]["events_url"])
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "rate_limited"
            assert "10 event streams open" in refused.json()["error"]["message"]
            assert refused.headers["retry-after"] == "5"
        # Closed streams give their places back.
        await asyncio.sleep(0.5)
        async with http.stream("GET", jobs[0]["events_url"]) as again:
            assert again.status_code == 200


async def test_the_process_cap_refuses_streams_beyond_it(start: Any) -> None:
    service = start(workers=0, SSE_MAX_STREAMS="3")
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
        jobs = [await ask(http, f"cap-{n}") for n in range(4)]
        async with contextlib.AsyncExitStack() as streams:
            for job in jobs[:3]:
                await streams.enter_async_context(idle_stream(service, job["events_url"]))
            await asyncio.sleep(0.5)
            refused = await http.get(jobs[3]["events_url"])
            assert refused.status_code == 429, refused.text
            assert "this server has 3 event streams open" in refused.json()["error"]["message"]


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(
    start: Any, redis_client: Redis
) -> None:
    service = start(workers=0, SSE_MAX_STREAMS_PER_USER="1", SSE_WRITE_TIMEOUT="1")
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
        job = await ask(http, "slow")
        async with idle_stream(service, job["events_url"], rcvbuf=4096):
            await asyncio.sleep(0.5)
            blocked = await http.get(job["events_url"])
            assert blocked.status_code == 429  # the slow stream holds the user's one place
            # Far more than the socket buffers hold: the API's writes block.
            big = {"text": "x" * 100_000}
            log = EventLog(redis_client)
            for _ in range(20):
                await log.publish_many(job["job_id"], [(TOKEN, big)] * 10)
            deadline = time.monotonic() + 15
            while True:
                async with http.stream("GET", job["events_url"]) as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the slow stream was never dropped"
                await asyncio.sleep(0.25)
