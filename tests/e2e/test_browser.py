"""The chat widget in a real browser, against the service as real processes.

Playwright for Python drives Debian's Chromium, headless, by its executable path:
``CHROMIUM_PATH``, by default ``/usr/bin/chromium`` (``apt-get install chromium``;
``.ci/run`` installs it when missing). Nothing downloads a browser: ``playwright
install`` is neither needed nor used. Playwright's CSS locators reach into the
widget's open shadow root, as a learner's clicks do.

Screenshots for review are written to ``SCREENSHOT_DIR`` (default
``.artifacts/screenshots`` in the checkout), at 1280 and 390 pixels wide.

When that browser is missing these tests FAIL; they are skipped only when
``SKIP_BROWSER_TESTS=1`` is set explicitly.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Request,
    Response,
    async_playwright,
    expect,
)

from devtools.processes import ROOT, Service
from rag.platform.settings import Settings
from rag.protection.auth import issue_token
from tests.e2e.test_service import poll
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.processes import DEMO_COURSE_KEY, cli

CHROMIUM_PATH = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_FOUND = Path(CHROMIUM_PATH).is_file() and os.access(CHROMIUM_PATH, os.X_OK)
SKIP = os.environ.get("SKIP_BROWSER_TESTS") == "1"
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR", ROOT / ".artifacts" / "screenshots"))

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(SKIP, reason="SKIP_BROWSER_TESTS=1: browser tests skipped on request"),
]

#: Long enough to watch it stream and to drop the connection midway; the markup-like
#: and non-ASCII pieces check that the page shows raw HTML as text.
#: Cites sources 1 and 2, as answers list only the sources they cite.
ANSWER = " ".join(
    f"Step {i}: knead, rest & fold <b>{i}</b> times — crème fraîche optional [{i % 2 + 1}]."
    for i in range(14)
)

#: Runs before the page's own scripts: records, in order, the text each render gives an
#: answer (``.answer`` in the widget's shadow root), and ``null`` when its actions bar
#: (Copy, Retry) is added, which happens once the answer is done. A document's observer
#: does not see into shadow roots, so every root attached is observed.
RECORDER = """
window.__shown = [];
const attach = Element.prototype.attachShadow;
Element.prototype.attachShadow = function (init) {
  const root = attach.call(this, init);
  new MutationObserver((records) => {
    for (const r of records) {
      const t = r.target;
      if (!(t instanceof Element)) continue;
      if (t.classList.contains("answer")) {
        const added = Array.from(r.addedNodes);
        const thinking = added.some((n) => n.classList && n.classList.contains("thinking"));
        if (!added.length || thinking) continue;
        window.__shown.push(added.map((n) => n.textContent).join("").trim());
      } else if (t.classList.contains("bubble")) {
        for (const n of r.addedNodes) {
          if (n instanceof Element && n.classList.contains("actions")) window.__shown.push(null);
        }
      }
    }
  }).observe(root, { childList: true, subtree: true });
  return root;
};
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
    """The chat page (or a host page with the widget) in a browser context, and what it did."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []  # uncaught exceptions in the page
        self.event_requests: list[Request] = []  # GET /v1/jobs/{id}/events, in order
        self.failed: list[Request] = []
        self.bad_responses: list[str] = []  # 4xx and 5xx the page received
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", self._request)
        page.on("requestfailed", lambda request: self.failed.append(request))
        page.on("response", self._response)

    def _request(self, request: Request) -> None:
        if "/events" in request.url:
            self.event_requests.append(request)

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.bad_responses.append(f"{response.status} {response.url}")

    def at(self, selector: str) -> Locator:
        """``selector`` inside the widget."""
        return self.page.locator(f"course-assistant {selector}")

    @property
    def answer(self) -> Locator:
        """The latest answer's rendered text."""
        return self.at(".msg.assistant .answer").last

    @property
    def done(self) -> Locator:
        """Answers that finished (their Copy/Retry bar is shown)."""
        return self.at(".msg.assistant .bubble > .actions")

    async def open(self, base_url: str, path: str = "/") -> str:
        """Open the page until the widget has its course and says the service is ready;
        the page's development user id."""
        await self.page.goto(base_url + path)
        widget = self.page.locator("course-assistant")
        await expect(widget).to_have_attribute("data-ready", "true", timeout=15_000)
        await expect(widget).to_have_attribute("data-course", DEMO_COURSE_KEY)
        user = await widget.get_attribute("dev-user")
        assert user
        return user

    async def ask(self, question: str, *, course: str | None = DEMO_COURSE_KEY) -> dict[str, Any]:
        """Type ``question`` and press Enter; the API's 202 body."""
        if course is not None and await self.at("select.course").is_visible():
            await self.at("select.course").select_option(course)
        await self.at("textarea").fill(question)
        async with self.page.expect_response(
            lambda r: r.request.method == "POST" and r.url.endswith("/questions")
        ) as info:
            await self.at("textarea").press("Enter")
        response = await info.value
        assert response.status == 202, await response.text()
        accepted: dict[str, Any] = await response.json()
        return accepted

    async def text(self) -> str:
        return (await self.answer.text_content() or "").strip()

    async def shown(self) -> list[str | None]:
        shown: list[str | None] = await self.page.evaluate("window.__shown")
        return shown

    async def pwned(self) -> Any:
        return await self.page.evaluate("window.__pwned")


async def new_chat(
    browser: Browser, width: int = 1000, height: int = 800
) -> tuple[BrowserContext, Chat]:
    context = await browser.new_context(viewport={"width": width, "height": height})
    await context.add_init_script(RECORDER)
    return context, Chat(await context.new_page())


@pytest.fixture
async def chat(browser: Browser) -> AsyncIterator[Chat]:
    context, opened = await new_chat(browser)
    try:
        yield opened
    finally:
        await context.close()


def screenshot(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}.png"


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
    rendered the final answer and its actions bar was added."""
    assert None in shown, f"no answer finished: {shown[-3:]}"
    before_done = shown[: shown.index(None)]
    assert len(before_done) >= 2, before_done
    return [str(text) for text in before_done[:-1]]


def assert_streamed_exactly(texts: list[str], answer: str, final: str) -> None:
    """Each streamed text extends the one before and is a prefix of ``answer``, and the
    final text is all of it: no token lost, repeated or out of order. (Renders are one
    per frame, so the last tokens may arrive with ``done``.)"""
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before), (before, after)
    for text in texts:
        assert answer.startswith(text), (text, answer)
    assert final == answer


async def wait_streaming(
    chat: Chat, answer: str, fraction: float = 0.1, within: float = 20
) -> None:
    deadline = time.monotonic() + within
    while len(await chat.text()) < len(answer) * fraction:
        assert time.monotonic() < deadline, "the answer did not start streaming"
        await asyncio.sleep(0.02)


async def test_an_answer_streams_into_the_page_with_its_sources(
    chat: Chat, service: Service, fake_openai: FakeServer, database_url: str
) -> None:
    await fake_openai.aconfigure(ttft=0.2, token_delay=0.03, answer=ANSWER)  # about 5 s
    user = await chat.open(service.base_url)
    accepted = await chat.ask("Why does my bread come out dense?")
    await expect(chat.at(".msg.user .bubble")).to_have_text("Why does my bread come out dense?")

    # Watch the answer grow until its actions bar says it is done.
    observed: list[str] = []
    deadline = time.monotonic() + 30
    while await chat.done.count() == 0:
        assert time.monotonic() < deadline, f"no answer after 30 s: {observed[-1:]}"
        text = await chat.text()
        if text and "…" not in text[-1:] and (not observed or text != observed[-1]):
            observed.append(text)
        await asyncio.sleep(0.05)
    partial = [text for text in observed if text != ANSWER and ANSWER.startswith(text)]
    assert len(partial) >= 2, f"saw the answer grow only {len(partial)} times: {observed}"

    job = await stored_job(service.base_url, accepted["job_id"], user)
    assert job["status"] == "succeeded", job
    assert job["answer"] == ANSWER
    # Raw HTML in the answer is shown as text, never as markup.
    assert await chat.text() == job["answer"]
    assert await chat.at(".answer b").count() == 0
    assert stored_message(database_url, accepted["job_id"]) == [job["answer"]]
    assert_streamed_exactly(streamed(await chat.shown()), job["answer"], await chat.text())

    # Each cited source: its number, topic and section, and a snippet; [n] links to it.
    assert [c["id"] for c in job["citations"]] == [1, 2], job["citations"]
    entries = chat.at(".sources li")
    await expect(entries).to_have_count(2)
    for i, citation in enumerate(job["citations"]):
        entry = entries.nth(i)
        await expect(entry.locator(".n")).to_have_text(f"[{citation['id']}]")
        await expect(entry.locator(".topic")).to_have_text(citation["topic_title"])
        assert citation["snippet"] and await entry.locator(".snippet").text_content() == (
            citation["snippet"]
        )
    await expect(chat.at(".answer a.cite")).to_have_count(14)  # one per [n] in the text

    assert len(chat.event_requests) == 1  # one connection, no reconnects
    assert chat.errors == []
    assert chat.bad_responses == []  # no favicon 404 either
    await chat.page.screenshot(path=screenshot("chat-streamed-1000"), full_page=True)


async def test_a_dropped_connection_resumes_from_last_event_id_without_losing_text(
    chat: Chat,
    service: Service,
    link: tuple[Link, str],
    fake_openai: FakeServer,
    database_url: str,
) -> None:
    proxy, url = link
    await fake_openai.aconfigure(ttft=0.2, token_delay=0.03, answer=ANSWER)
    user = await chat.open(url)
    accepted = await chat.ask("How long should dough rise?")

    # A few tokens in, the network goes: the stream's connection is reset and the
    # browser is offline for 1.5 s (the page's retries fail), then back.
    await wait_streaming(chat, ANSWER)
    context = chat.page.context
    await context.set_offline(True)
    proxy.cut()
    await asyncio.sleep(1.5)
    cut_at = await chat.text()
    await context.set_offline(False)
    assert len(cut_at) < len(ANSWER), "the answer finished before the connection dropped"

    await expect(chat.done).to_have_count(1, timeout=30_000)
    job = await stored_job(service.base_url, accepted["job_id"], user)
    assert job["status"] == "succeeded", job
    assert job["answer"] == ANSWER
    assert await chat.text() == job["answer"]
    assert stored_message(database_url, accepted["job_id"]) == [job["answer"]]
    # Shown as it streamed, across the reconnect: not just replaced by ``done``.
    texts = streamed(await chat.shown())
    assert cut_at in texts
    assert_streamed_exactly(texts, job["answer"], await chat.text())

    # The first connection failed midway and the page came back from its last event id.
    first, *later = chat.event_requests
    assert first in chat.failed, [(r.url, r.failure) for r in chat.failed]
    assert "last-event-id" not in first.headers
    assert later, "the page never reconnected"
    resumed_from = [r.headers.get("last-event-id") for r in later]
    assert all(resumed_from), resumed_from
    assert later[-1] not in chat.failed
    assert chat.errors == []


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
    failed = chat.at(".msg.assistant.failed")
    await expect(failed).to_contain_text("can't reach its language model", timeout=30_000)
    text = await failed.text_content() or ""
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
        await failed.locator(".retry").click()
    assert (await info.value).status == 202
    await expect(chat.answer).to_have_text("Warm, about 24 to 27 degrees.", timeout=30_000)
    await expect(chat.at(".msg.assistant.failed")).to_have_count(0)
    assert chat.errors == []


MARKDOWN_ANSWER = """## Proofing, in short

Keep the dough **warm** and *covered* [1], as a source that was not offered says [9]:

- 24 to 27 °C
- about `75 %` humidity

| Stage | Time |
|---|---|
| Bulk | 2 h |
| Proof | 1 h |

```
bake at 230 °C
```

<script>window.__pwned = "script"</script> <img src="x" onerror="window.__pwned = 'img'">
<iframe src="javascript:window.__pwned='iframe'"></iframe>

Inline <img src="y" onerror="window.__pwned = 'inline'"> too, and
[a harmless-looking link](javascript:window.__pwned='link') and a [real one](https://example.org/bread).
"""


async def test_markdown_renders_and_nothing_the_model_writes_runs(
    chat: Chat, service: Service, fake_openai: FakeServer
) -> None:
    await fake_openai.aconfigure(token_delay=0.005, answer=MARKDOWN_ANSWER)
    await chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await chat.open(service.base_url)
    # Shift+Enter is a new line in the question; Enter sends it.
    box = chat.at("textarea")
    await box.fill("How do I proof?")
    await box.press("Shift+Enter")
    await box.type("Keep it short.")
    async with chat.page.expect_response(lambda r: r.url.endswith("/questions")) as info:
        await box.press("Enter")
    assert (await info.value).status == 202
    await expect(chat.at(".msg.user .bubble")).to_have_text("How do I proof?\nKeep it short.")
    await expect(chat.done).to_have_count(1, timeout=30_000)

    answer = chat.at(".msg.assistant .answer")
    await expect(answer.locator("h2")).to_have_text("Proofing, in short")
    await expect(answer.locator("strong")).to_have_text("warm")
    await expect(answer.locator("ul > li")).to_have_count(2)
    await expect(answer.locator("code").first).to_have_text("75 %")
    await expect(answer.locator("table td").first).to_have_text("Bulk")
    await expect(answer.locator("pre code")).to_have_text("bake at 230 °C")
    # Raw HTML is text: no element of it exists, its words show, nothing ran.
    for tag in ("script", "img", "iframe"):
        assert await answer.locator(tag).count() == 0, tag
    shown = await answer.text_content() or ""
    assert '<script>window.__pwned = "script"</script>' in shown
    assert "onerror" in shown
    assert await answer.locator('a[href^="javascript"]').count() == 0
    await expect(answer.locator('a[href="https://example.org/bread"]')).to_have_attribute(
        "rel", "noopener noreferrer nofollow"
    )
    # [1] was offered and links to its source; [9] names none, so it is no link.
    await expect(answer.locator("a.cite")).to_have_count(1)
    await expect(answer.locator("span.cite")).to_have_text("[9]")
    await expect(chat.at(".sources li")).to_have_count(1)
    await answer.get_by_text("a harmless-looking link").click()
    await asyncio.sleep(0.3)
    assert await chat.pwned() is None

    # Copy puts the answer's Markdown on the clipboard.
    await chat.at(".actions .copy").click()
    await expect(chat.at(".actions .copy")).to_have_text("Copied")
    copied = await chat.page.evaluate("navigator.clipboard.readText()")
    assert copied.strip() == MARKDOWN_ANSWER.strip()
    assert chat.errors == []


HOSTILE_TOPIC = """A course text with markup in it.

## Safe heading

Text <img src="x" onerror="window.__pwned = 'course img'"> and
<script>window.__pwned = 'course script'</script> and <b>bold tags</b>.
"""


async def test_a_course_text_with_markup_opens_as_text(
    chat: Chat,
    service: Service,
    demo_env: dict[str, str],
    fake_openai: FakeServer,
    tmp_path: Path,
) -> None:
    root = tmp_path / "hostile"
    root.mkdir()
    (root / "course.yaml").write_text('key: hostile\ntitle: "Hostile <b>course</b>"\n')
    (root / "01-01-markup.md").write_text(
        f"---\nmodule: 1\nposition: 1\ntitle: <i>Markup</i> topic\n---\n{HOSTILE_TOPIC}"
    )
    cli(demo_env, "import-course", str(root))
    await fake_openai.aconfigure(answer="The course says so [1].")
    await chat.open(service.base_url)
    await expect(chat.at("select.course option")).to_have_count(2)
    await chat.ask("What does the safe heading say?", course="hostile")
    await expect(chat.done).to_have_count(1, timeout=30_000)
    await chat.at(".answer a.cite").first.click()
    reader = chat.at(".reader")
    await expect(reader).to_have_attribute("data-opened", "true")
    await expect(reader.locator("h2").first).to_have_text("<i>Markup</i> topic")
    body = reader.locator(".topic-body")
    for tag in ("script", "img", "b", "i"):
        assert await body.locator(tag).count() == 0, tag
    assert "<script>window.__pwned = 'course script'</script>" in (await body.text_content() or "")
    await expect(body.locator('h2[data-anchor="safe-heading"]')).to_have_text("Safe heading")
    await asyncio.sleep(0.3)
    assert await chat.pwned() is None
    assert chat.errors == []


async def test_stop_cancels_the_job_and_keeps_what_had_come(
    chat: Chat, service: Service, fake_openai: FakeServer
) -> None:
    await fake_openai.aconfigure(ttft=1.5, token_delay=0.05, answer=ANSWER)  # about 9 s
    user = await chat.open(service.base_url)
    accepted = await chat.ask("How do I shape a batard?")
    # Until the first token, the answer says it is working on it.
    await expect(chat.at(".msg.assistant .thinking")).to_be_visible()
    await expect(chat.at(".msg.assistant")).to_have_attribute("aria-busy", "true")
    await wait_streaming(chat, ANSWER)
    await expect(chat.at(".msg.assistant .thinking")).to_have_count(0)
    await expect(chat.at(".stop")).to_be_visible()
    await chat.at(".stop").click()
    await expect(chat.at(".msg.assistant .note")).to_have_text("You stopped this answer.")
    job = await stored_job(service.base_url, accepted["job_id"], user)
    assert job["status"] == "cancelled", job
    kept = await chat.text()
    assert kept and len(kept) < len(ANSWER) and ANSWER.startswith(kept)
    # The composer is back: Stop hides and Send works.
    await expect(chat.at(".stop")).to_be_hidden()
    await expect(chat.at(".send")).to_be_enabled()
    assert chat.errors == []


async def test_a_reload_keeps_the_session_and_earlier_sessions_are_listed(
    chat: Chat, service: Service, fake_openai: FakeServer
) -> None:
    await fake_openai.aconfigure(answer="Shape it tight [1].")
    await chat.open(service.base_url)
    first = await chat.ask("How do I shape a boule?")
    await expect(chat.done).to_have_count(1, timeout=30_000)
    await fake_openai.aconfigure(answer="Use a **bench knife** [1].")
    second = await chat.ask("What tool helps?")
    assert second["session_id"] == first["session_id"]
    await expect(chat.done).to_have_count(2, timeout=30_000)

    await chat.page.reload()
    await expect(chat.at(".msg")).to_have_count(4, timeout=15_000)
    await expect(chat.at(".msg.user .bubble")).to_have_text(
        ["How do I shape a boule?", "What tool helps?"]
    )
    await expect(chat.at(".msg.assistant .answer")).to_have_text(
        ["Shape it tight [1].", "Use a bench knife [1]."]
    )
    await expect(chat.at(".msg.assistant .answer strong")).to_have_text("bench knife")
    await expect(chat.at(".msg.assistant .sources")).to_have_count(2)  # stored citations

    # A new chat is a new session; the earlier one is listed and opens again.
    await chat.at(".new").click()
    await expect(chat.at(".msg")).to_have_count(0)
    await fake_openai.aconfigure(answer="Bake it hot.")
    third = await chat.ask("How hot is the oven?")
    assert third["session_id"] != first["session_id"]
    await expect(chat.done).to_have_count(1, timeout=30_000)
    await chat.at(".toggle-sessions").click()
    sessions = chat.at(".sessions li button")
    await expect(sessions).to_have_count(2)
    # Newest first; the current one is marked.
    assert await sessions.nth(0).get_attribute("data-session") == third["session_id"]
    await expect(sessions.nth(0)).to_have_attribute("aria-current", "true")
    await sessions.nth(1).click()
    await expect(chat.at(".msg")).to_have_count(4)
    await expect(chat.at(".msg.user .bubble").first).to_have_text("How do I shape a boule?")
    # Retry on a stored answer asks its question again, in that session.
    async with chat.page.expect_response(lambda r: r.url.endswith("/questions")) as info:
        await chat.at(".msg.assistant .actions .retry").last.click()
    again = await (await info.value).json()
    assert again["session_id"] == first["session_id"]
    await expect(chat.at(".msg.user .bubble").last).to_have_text("What tool helps?")
    assert chat.errors == []


async def test_a_citation_link_opens_the_topic_at_its_section(
    chat: Chat, service: Service, fake_openai: FakeServer
) -> None:
    await fake_openai.aconfigure(answer="Salt tightens gluten [1]. Yeast needs warmth [2].")
    user = await chat.open(service.base_url)
    accepted = await chat.ask("What do salt and yeast do to dough?")
    await expect(chat.done).to_have_count(1, timeout=30_000)
    # A screen reader is told the finished answer once (not each token).
    await expect(chat.at(".announce")).to_have_text(
        "Answer: Salt tightens gluten [1]. Yeast needs warmth [2]."
    )
    await expect(chat.at(".announce")).to_have_attribute("aria-live", "polite")
    job = await stored_job(service.base_url, accepted["job_id"], user)
    cited = [c for c in job["citations"] if c["anchor"]]
    assert cited, job["citations"]
    citation = cited[-1]  # the last one: its section is likely far down its topic
    await chat.at(f'.answer a.cite[data-cite="{citation["id"]}"]').click()
    reader = chat.at(".reader")
    await expect(reader).to_have_attribute("data-opened", "true")
    await expect(reader.locator("header h2")).to_have_text(citation["topic_title"])
    heading = reader.locator(f'.topic-body [data-anchor="{citation["anchor"]}"]')
    await expect(heading).to_have_text(citation["heading_path"][-1])
    await expect(heading).to_have_class("target")
    await expect(heading).to_be_in_viewport()
    await expect(heading).to_be_focused()
    # Back (or Escape) returns to the chat; the sources list opens the same way.
    await chat.at(".reader .back").click()
    await expect(reader).to_be_hidden()
    await chat.at(f'.sources a[data-n="{citation["id"]}"]').click()
    await expect(heading).to_be_in_viewport()
    await chat.page.keyboard.press("Escape")
    await expect(reader).to_be_hidden()
    assert chat.errors == []


HOSTILE_HOST = """<!doctype html>
<html><head><meta charset="utf-8"><title>A platform with loud CSS</title>
<style>
  * { font-size: 40px !important; color: rgb(255, 0, 0) !important; line-height: 3 !important;
      letter-spacing: 6px !important; font-family: serif !important; }
  button { background: rgb(0, 128, 0) !important; }
  .answer, .msg, .sources, .panel, .thread { display: none !important; }
  div, section, textarea { border: 7px dashed red !important; }
  :root { --bg: red; --fg: red; --accent: red; }
</style></head>
<body>
  <h1>Lesson</h1>
  <div class="thread" id="host-thread">The platform's own thread box.</div>
  <button class="send" id="host-send">The platform's button</button>
  <script type="module" src="/static/assistant.js"></script>
  <course-assistant course="bread-science" token="TOKEN"></course-assistant>
</body></html>
"""


async def test_the_widget_works_inside_a_host_page_with_hostile_css(
    browser: Browser, start: Callable[..., Service], fake_openai: FakeServer
) -> None:
    """A course platform's page: global !important rules, the widget's own class names,
    a learner's JWT in the token attribute. Nothing leaks in or out of the shadow root."""
    secret = "s" * 40
    service = start(AUTH_JWT_SECRET=secret)
    token = issue_token(Settings.from_env({"AUTH_JWT_SECRET": secret}), "embedded-learner")
    context, chat = await new_chat(browser, 1280, 800)
    try:
        host = service.base_url + "/platform/lesson"
        await chat.page.route(host, lambda route: route.fulfill(
            content_type="text/html", body=HOSTILE_HOST.replace("TOKEN", token)))  # fmt: skip
        await fake_openai.aconfigure(answer="Salt **tightens** gluten [1].")
        await chat.page.goto(host)
        widget = chat.page.locator("course-assistant")
        await expect(widget).to_have_attribute("data-course", DEMO_COURSE_KEY, timeout=15_000)
        launcher = chat.at(".launcher")
        await expect(launcher).to_be_visible()
        await launcher.click()
        await expect(chat.at(".panel")).to_be_visible()
        accepted = await chat.ask("What does salt do?", course=None)
        await expect(chat.done).to_have_count(1, timeout=30_000)
        await expect(chat.answer.locator("strong")).to_have_text("tightens")
        await expect(chat.at(".sources li")).to_have_count(1)

        def style(locator: Locator, prop: str) -> Any:
            return locator.evaluate(f"(e) => getComputedStyle(e).getPropertyValue('{prop}')")

        # In: the host's rules do not reach the widget's text, buttons or layout.
        assert await style(chat.answer, "font-size") == "15px"
        assert await style(chat.answer, "color") != "rgb(255, 0, 0)"
        assert await style(chat.answer, "letter-spacing") == "normal"
        # Nor does the host's root font size (40px here) scale the widget's lengths.
        assert await style(chat.at(".thread"), "padding-top") == "15px"
        assert float((await style(chat.at(".actions .copy"), "font-size"))[:-2]) < 15
        assert await style(chat.at(".send"), "background-color") != "rgb(0, 128, 0)"
        assert await style(chat.at("textarea"), "border-top-style") != "dashed"
        # Out: the widget's rules (.thread's padding, .send's colours) stay inside.
        assert await style(chat.page.locator("#host-thread"), "padding-top") == "0px"
        assert await style(chat.page.locator("#host-send"), "background-color") == "rgb(0, 128, 0)"

        # The question was asked as the token's user.
        job = await stored_job(service.base_url, accepted["job_id"], "embedded-learner")
        assert job["status"] == "succeeded"
        assert chat.errors == []
        await chat.page.screenshot(path=screenshot("widget-hostile-host-1280"))
    finally:
        await context.close()


async def until(check: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    """Wait until ``check()`` is true."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "still not true after the wait"
        await asyncio.sleep(0.05)


async def test_auto_scroll_follows_the_answer_until_the_reader_scrolls_up(
    browser: Browser, service: Service, fake_openai: FakeServer
) -> None:
    long_answer = "\n\n".join(f"Paragraph {i} about dough [1]." for i in range(60))
    await fake_openai.aconfigure(ttft=0.1, token_delay=0.02, answer=long_answer)
    context, chat = await new_chat(browser, 390, 600)
    try:
        await chat.open(service.base_url)
        await chat.ask("Tell me everything about dough.")
        thread = chat.at(".thread")
        gap = "(t) => t.scrollHeight - t.scrollTop - t.clientHeight"
        await until(lambda: thread.evaluate("(t) => t.scrollHeight > 2 * t.clientHeight"))
        assert await thread.evaluate(gap) < 48  # following the answer as it grows
        # The reader scrolls up: the page stays where they are while text keeps coming.
        await thread.evaluate("(t) => { t.scrollTop = 0; }")
        grown = await thread.evaluate("(t) => t.scrollHeight")
        await until(lambda: thread.evaluate(f"(t) => t.scrollHeight > {grown}"))
        assert await thread.evaluate("(t) => t.scrollTop") == 0
        await expect(chat.at(".jump")).to_be_visible()
        await chat.at(".jump").click()
        await expect(chat.at(".jump")).to_be_hidden()
        assert await thread.evaluate(gap) < 48
        await expect(chat.done).to_have_count(1, timeout=30_000)
        assert await thread.evaluate(gap) < 48
        assert chat.errors == []
    finally:
        await context.close()


@pytest.mark.parametrize("width", [1280, 390, 360])
async def test_screenshots_of_the_page_and_the_embedded_panel(
    browser: Browser, service: Service, fake_openai: FakeServer, width: int
) -> None:
    """For review: the chat page and the demo lesson with the panel open, written to
    SCREENSHOT_DIR. Checked as well: nothing is wider than the window."""
    await fake_openai.aconfigure(answer=MARKDOWN_ANSWER.split("<script>")[0] + "See [2].")
    context, chat = await new_chat(browser, width, 844)
    try:
        await chat.open(service.base_url)
        await chat.ask("How do I proof?")
        await expect(chat.done).to_have_count(1, timeout=30_000)
        overflow = await chat.page.evaluate("document.scrollingElement.scrollWidth")
        assert overflow <= width
        await chat.page.screenshot(path=screenshot(f"chat-page-{width}"))
        await chat.at(".answer a.cite").first.click()
        await expect(chat.at(".reader")).to_have_attribute("data-opened", "true")
        await chat.page.screenshot(path=screenshot(f"chat-topic-{width}"))

        await chat.open(service.base_url, "/demo/lesson")
        await chat.at(".launcher").click()
        await expect(chat.at(".msg")).to_have_count(2)  # the same learner's session, kept
        box = await chat.at(".panel").bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5
        await chat.page.screenshot(path=screenshot(f"lesson-panel-{width}"))
        assert chat.errors == []
    finally:
        await context.close()
