"""The chat page at ``/`` in a real browser, against the service as real processes.

Playwright for Python drives Debian's Chromium, headless, by its executable path:
``CHROMIUM_PATH``, by default ``/usr/bin/chromium`` (``apt-get install chromium``;
``.ci/run`` installs it when missing). Nothing downloads a browser: ``playwright
install`` is neither needed nor used.

When that browser is missing these tests FAIL; they are skipped only when
``SKIP_BROWSER_TESTS=1`` is set explicitly.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.async_api import Browser, Locator, Page, Request, async_playwright, expect

from devtools.processes import Service
from tests.e2e.test_service import poll
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.processes import DEMO_COURSE_KEY

CHROMIUM_PATH = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_FOUND = Path(CHROMIUM_PATH).is_file() and os.access(CHROMIUM_PATH, os.X_OK)
SKIP = os.environ.get("SKIP_BROWSER_TESTS") == "1"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(SKIP, reason="SKIP_BROWSER_TESTS=1: browser tests skipped on request"),
]

#: Long enough to watch it stream and to drop the connection midway; the markup-like
#: and non-ASCII pieces check that the page shows text as text.
#: Cites sources 1 and 2, as answers list only the sources they cite.
ANSWER = " ".join(
    f"Step {i}: knead, rest & fold <b>{i}</b> times — crème fraîche optional [{i % 2 + 1}]."
    for i in range(14)
)

#: Runs before the page's own script: records, in order, every text the answer
#: elements (``#log .a``) are given, and ``null`` when a sources line (``#log .meta``)
#: is added. Each ``textContent =`` replaces the text node, so a record's added
#: nodes hold exactly the text assigned then, however records are batched.
RECORDER = """
window.__shown = [];
new MutationObserver((records) => {
  for (const r of records) {
    const t = r.target;
    if (!(t instanceof Element)) continue;
    if (t.classList.contains("a")) {
      window.__shown.push(Array.from(r.addedNodes, (n) => n.textContent).join(""));
    } else if (t.id === "log") {
      for (const n of r.addedNodes) {
        if (n instanceof Element && n.classList.contains("meta")) window.__shown.push(null);
      }
    }
  }
}).observe(document, { childList: true, subtree: true });
"""


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium from ``CHROMIUM_PATH``; fails (does not skip) when it is missing."""
    if not CHROMIUM_FOUND:
        pytest.fail(
            f"no Chromium at {CHROMIUM_PATH}: `apt-get install chromium` (as .ci/run does), "
            "set CHROMIUM_PATH, or set SKIP_BROWSER_TESTS=1 to skip the browser tests",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM_PATH)
        try:
            yield launched
        finally:
            await launched.close()


class Chat:
    """The page in a fresh browser context, and what it did."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []  # uncaught exceptions in the page
        self.event_requests: list[Request] = []  # GET /v1/jobs/{id}/events, in order
        self.failed: list[Request] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", self._request)
        page.on("requestfailed", lambda request: self.failed.append(request))

    def _request(self, request: Request) -> None:
        if "/events" in request.url:
            self.event_requests.append(request)

    @property
    def answer(self) -> Locator:
        return self.page.locator("#log .a")

    @property
    def sources(self) -> Locator:
        return self.page.locator("#log .meta")

    async def open(self, base_url: str) -> str:
        """Open ``/`` until it says ready; the page's development user id."""
        await self.page.goto(base_url + "/")
        await expect(self.page.locator("#ready")).to_have_text("ready", timeout=15_000)
        user = await self.page.locator("#who").text_content()
        assert user
        return user

    async def ask(self, question: str) -> dict[str, Any]:
        """Pick the demo course, type ``question``, submit; the API's 202 body."""
        await self.page.select_option("#course", DEMO_COURSE_KEY)
        await self.page.fill("#question", question)
        async with self.page.expect_response(
            lambda r: r.request.method == "POST" and r.url.endswith("/questions")
        ) as info:
            await self.page.click("#ask button")
        response = await info.value
        assert response.status == 202, await response.text()
        accepted: dict[str, Any] = await response.json()
        return accepted

    async def text(self) -> str:
        return await self.answer.text_content() or ""

    async def shown(self) -> list[str | None]:
        shown: list[str | None] = await self.page.evaluate("window.__shown")
        return shown


@pytest.fixture
async def chat(browser: Browser) -> AsyncIterator[Chat]:
    context = await browser.new_context(viewport={"width": 1000, "height": 800})
    await context.add_init_script(RECORDER)
    try:
        yield Chat(await context.new_page())
    finally:
        await context.close()


class Link:
    """A TCP proxy in front of the API whose open connections the test can cut,
    as a dropped network does. (``BrowserContext.set_offline`` only fails new
    requests in Chromium: a response already streaming carries on.)"""

    def __init__(self, upstream: str) -> None:
        parsed = urlsplit(upstream)
        assert parsed.hostname and parsed.port, upstream
        self.host, self.port = parsed.hostname, parsed.port
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.WriteTransport] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            try:
                up_r, up_w = await asyncio.open_connection(self.host, self.port)
            except OSError:
                client_w.transport.abort()
                return
            self.transports |= {client_w.transport, up_w.transport}
            await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))
            self.transports -= {client_w.transport, up_w.transport}
        finally:
            self.tasks.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.transport.abort()

    def cut(self) -> None:
        """Reset every open connection, both ways, mid-response or not."""
        for transport in self.transports:
            transport.abort()
        self.transports.clear()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.cut()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


@pytest.fixture
async def link(service: Service) -> AsyncIterator[tuple[Link, str]]:
    """A :class:`Link` to the service and its URL."""
    proxy = Link(service.base_url)
    url = await proxy.start()
    try:
        yield proxy, url
    finally:
        await proxy.close()


async def stored_job(base_url: str, job_id: str, user: str, within: float = 30) -> dict[str, Any]:
    """The finished job as the page's user reads it over the API."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        return await poll(http, job_id, {"X-User-Id": user}, within)


def stored_message(database_url: str, job_id: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT content FROM chat_messages WHERE job_id = %s AND role = 'assistant'",
            (job_id,),
        ).fetchall()
    return [str(row[0]) for row in rows]


def streamed(shown: list[str | None]) -> list[str]:
    """The texts tokens gave the (first) answer: what it showed before ``done``
    replaced it with the final answer and the sources line was added."""
    assert None in shown, f"no sources line was added: {shown[-3:]}"
    before_done = shown[: shown.index(None)]
    assert len(before_done) >= 2, before_done
    return [str(text) for text in before_done[:-1]]


def assert_streamed_exactly(texts: list[str], answer: str) -> None:
    """Each streamed text extends the one before and is a prefix of ``answer``; the
    last is all of it: no token lost, repeated or out of order."""
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before), (before, after)
    for text in texts:
        assert answer.startswith(text), (text, answer)
    assert texts[-1] == answer


async def test_an_answer_streams_into_the_page_with_its_sources(
    chat: Chat, service: Service, fake_openai: FakeServer, database_url: str, tmp_path: Path
) -> None:
    await fake_openai.aconfigure(ttft=0.2, token_delay=0.03, answer=ANSWER)  # about 5 s
    user = await chat.open(service.base_url)
    accepted = await chat.ask("Why does my bread come out dense?")
    await expect(chat.page.locator("#log .q")).to_have_text("Why does my bread come out dense?")

    # Watch the answer grow until the sources line says it is done.
    observed: list[str] = []
    deadline = time.monotonic() + 30
    while await chat.sources.count() == 0:
        assert time.monotonic() < deadline, f"no answer after 30 s: {observed[-1:]}"
        text = await chat.text()
        if text not in ("", "…") and (not observed or text != observed[-1]):
            observed.append(text)
        await asyncio.sleep(0.05)
    partial = [text for text in observed if text != ANSWER]
    assert len(partial) >= 2, f"saw the answer grow only {len(partial)} times: {observed}"
    for text in partial:
        assert ANSWER.startswith(text) and len(text) < len(ANSWER)

    job = await stored_job(service.base_url, accepted["job_id"], user)
    assert job["status"] == "succeeded", job
    assert job["answer"] == ANSWER
    assert await chat.text() == job["answer"]
    assert stored_message(database_url, accepted["job_id"]) == [job["answer"]]
    assert_streamed_exactly(streamed(await chat.shown()), job["answer"])

    sources = await chat.sources.text_content() or ""
    assert job["citations"], job
    assert sources.startswith("Sources: ")
    # One entry per topic: its first citation's id and title.
    first: dict[str, int] = {}
    for citation in job["citations"]:
        first.setdefault(citation["topic_title"], citation["id"])
    expected = " · ".join(f"[{i}] {title}" for title, i in first.items())
    assert sources == f"Sources: {expected}", sources

    assert len(chat.event_requests) == 1  # one connection, no reconnects
    assert chat.errors == []
    await chat.page.screenshot(path=tmp_path / "chat.png", full_page=True)


async def test_a_dropped_connection_resumes_from_last_event_id_without_losing_text(
    chat: Chat,
    service: Service,
    link: tuple[Link, str],
    fake_openai: FakeServer,
    database_url: str,
    tmp_path: Path,
) -> None:
    proxy, url = link
    await fake_openai.aconfigure(ttft=0.2, token_delay=0.03, answer=ANSWER)
    user = await chat.open(url)
    accepted = await chat.ask("How long should dough rise?")

    # A few tokens in, the network goes: the stream's connection is reset and the
    # browser is offline for 1.5 s (the page's retries fail), then back.
    deadline = time.monotonic() + 20
    while len(await chat.text()) < len(ANSWER) // 10:
        assert time.monotonic() < deadline, "the answer did not start streaming"
        await asyncio.sleep(0.02)
    context = chat.page.context
    await context.set_offline(True)
    proxy.cut()
    await asyncio.sleep(1.5)
    cut_at = await chat.text()
    await context.set_offline(False)
    assert len(cut_at) < len(ANSWER), "the answer finished before the connection dropped"

    await expect(chat.sources).to_have_count(1, timeout=30_000)
    job = await stored_job(service.base_url, accepted["job_id"], user)
    assert job["status"] == "succeeded", job
    assert job["answer"] == ANSWER
    assert await chat.text() == job["answer"]
    assert stored_message(database_url, accepted["job_id"]) == [job["answer"]]
    # Shown as it streamed, across the reconnect: not just replaced by ``done``.
    texts = streamed(await chat.shown())
    assert cut_at in texts
    assert_streamed_exactly(texts, job["answer"])

    # The first connection failed midway and the page came back from its last event id.
    first, *later = chat.event_requests
    assert first in chat.failed, [(r.url, r.failure) for r in chat.failed]
    assert "last-event-id" not in first.headers
    assert later, "the page never reconnected"
    resumed_from = [r.headers.get("last-event-id") for r in later]
    assert all(resumed_from), resumed_from
    assert later[-1] not in chat.failed
    assert chat.errors == []
    await chat.page.screenshot(path=tmp_path / "chat-reconnected.png", full_page=True)


async def test_a_provider_outage_shows_the_learner_our_words_and_a_retry(
    chat: Chat, service: Service, fake_openai: FakeServer
) -> None:
    """The page used to show "Error: OpenAI embeddings failed after 4 attempts: HTTP
    503", an operator's message. The learner gets a plain sentence and a button; the
    detail stays in the job."""
    await fake_openai.aadd_faults(
        {"endpoint": "embeddings", "kind": "status", "status": 503, "times": 1000}
    )
    user = await chat.open(service.base_url)
    accepted = await chat.ask("How warm should the proofing spot be?")
    failed = chat.page.locator("#log .a.failed")
    await expect(failed).to_contain_text("can't reach its language model", timeout=30_000)
    text = await chat.text()
    assert "OpenAI" not in text and "503" not in text and "attempt" not in text, text
    job = await stored_job(service.base_url, accepted["job_id"], user)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "provider_unavailable"
    assert "OpenAI embeddings failed" in job["error"]["message"]  # the operator's detail
    # The provider is back: "Try again" asks the same question, and the answer comes.
    fake_openai.reset()
    await fake_openai.aconfigure(answer="Warm, about 24 to 27 degrees.")
    async with chat.page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith("/questions")
    ) as info:
        await chat.page.click("#log .a .retry")
    assert (await info.value).status == 202
    await expect(chat.answer).to_have_text("Warm, about 24 to 27 degrees.", timeout=30_000)
    await expect(chat.page.locator("#log .a.failed")).to_have_count(0)
    assert chat.errors == []
