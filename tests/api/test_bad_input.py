"""Bad input of every kind is a 4xx in the one error shape, and nothing is queued or stored.

Each case goes through the whole app (Litestar's test client, real PostgreSQL and
Redis). Bodies are sent as raw bytes where JSON itself could not carry the fault.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from arq.connections import ArqRedis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.learners.history import TopicKey, encode_cursor
from rag.platform.db import Database
from rag.platform.settings import Settings
from tests.api.test_questions import ALICE, URL, Client
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import TOPICS, write_course


@pytest.fixture
async def client(
    db: Database, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[Client]:
    """The app with the development identity header, a course, and alice enrolled in it."""
    await import_course(db, load_course(write_course(tmp_path / "c", TOPICS)))
    await db.execute("INSERT INTO enrollments (user_id, course_id) SELECT 'alice', id FROM courses")
    settings = make_settings(DEV_IDENTITY_HEADER="true")
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


JSON = {**ALICE, "Content-Type": "application/json"}
NIL = "00000000-0000-0000-0000-000000000000"


def raw(body: bytes, headers: dict[str, str] = JSON) -> dict[str, Any]:
    return {"content": body, "headers": headers}


def js(body: object, headers: dict[str, str] = ALICE) -> dict[str, Any]:
    return {"json": body, "headers": headers}


def get(headers: dict[str, str] = ALICE) -> dict[str, Any]:
    return {"headers": headers}


def encode_cursor_raw(value: list[object]) -> str:
    """A cursor as the service writes them, around any JSON array (a forged one)."""
    return base64.urlsafe_b64encode(msgspec.json.encode(value)).rstrip(b"=").decode()


# (id, method, url, request keyword arguments, status, error code)
CASES: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # --- the body: size, encoding, syntax, type
    ("body-over-64KiB", "POST", URL, js({"question": "x" * 70_000}), 413, "payload_too_large"),
    ("invalid-utf8", "POST", URL, raw(b'{"question": "\xff\xfe"}'), 400, "bad_request"),
    ("utf8-overlong-nul", "POST", URL, raw(b'{"question": "a\xc0\x80"}'), 400, "bad_request"),
    ("lone-high-surrogate", "POST", URL, raw(b'{"question": "a\\ud800b"}'), 400, "bad_request"),
    ("lone-high-at-end", "POST", URL, raw(b'{"question": "\\ud800"}'), 400, "bad_request"),
    ("lone-low-surrogate", "POST", URL, raw(b'{"question": "a\\udfff"}'), 400, "bad_request"),
    ("truncated-json", "POST", URL, raw(b'{"question": '), 400, "bad_request"),
    ("trailing-garbage", "POST", URL, raw(b'{"question": "hi"} x'), 400, "bad_request"),
    ("empty-body", "POST", URL, raw(b""), 400, "invalid_request"),
    ("json-null", "POST", URL, raw(b"null"), 400, "invalid_request"),
    ("json-array", "POST", URL, raw(b'["hi"]'), 400, "invalid_request"),
    (
        "deep-nesting",
        "POST",
        URL,
        raw(b'{"question": "hi", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
        400,
        "bad_request",
    ),
    ("unknown-field", "POST", URL, js({"question": "ok", "extra": 1}), 400, "invalid_request"),
    ("question-not-a-string", "POST", URL, js({"question": ["a"]}), 400, "invalid_request"),
    ("question-null", "POST", URL, js({"question": None}), 400, "invalid_request"),
    ("question-missing", "POST", URL, js({"session_id": None}), 400, "invalid_request"),
    # --- the content type
    ("text-plain", "POST", URL, raw(b'{"question": "hi"}', {**ALICE, "Content-Type": "text/plain"}),
     415, "unsupported_media_type"),
    ("no-content-type", "POST", URL, raw(b'{"question": "hi"}', ALICE), 415,
     "unsupported_media_type"),
    ("form", "POST", URL, {"data": {"question": "hi"}, "headers": ALICE}, 415,
     "unsupported_media_type"),
    ("multipart", "POST", URL, {"files": {"question": ("q.txt", b"hi")}, "headers": ALICE}, 415,
     "unsupported_media_type"),
    ("latin-1-charset", "POST", URL,
     raw(b'{"question": "hi"}', {**ALICE, "Content-Type": "application/json; charset=latin-1"}),
     415, "unsupported_media_type"),
    # --- the question
    ("empty", "POST", URL, js({"question": ""}), 422, "invalid_request"),
    # Format characters (Cf) render as nothing: zero-width space, joiners, bidi marks,
    # overrides and isolates, the BOM, a soft hyphen, with or without whitespace.
    ("zero-width-only", "POST", URL, js({"question": "\u200b\u200b\u200b"}), 422,
     "invalid_request"),
    ("format-chars-only", "POST", URL,
     js({"question": " \u200d\u200c\u200e\u200f\u202e\u2066\u2069\ufeff\u00ad\u2060 "}),
     422, "invalid_request"),
    ("whitespace-only", "POST", URL, js({"question": " \t\n\u3000\u2003 "}), 422,
     "invalid_request"),
    ("over-max-chars", "POST", URL, js({"question": "x" * 4001}), 422, "invalid_request"),
    # 1,000 characters, 3,000 tokens: within QUESTION_MAX_CHARS, over QUESTION_MAX_TOKENS.
    ("over-max-tokens", "POST", URL, js({"question": "\U0001f35e" * 1000}), 422,
     "invalid_request"),
    ("nul-escape", "POST", URL, raw(b'{"question": "a\\u0000b"}'), 422, "invalid_request"),
    ("nul-char", "POST", URL, js({"question": "nul\x00byte"}), 422, "invalid_request"),
    ("control-char", "POST", URL, js({"question": "bell\x07"}), 422, "invalid_request"),
    ("escape-char", "POST", URL, js({"question": "\x1b[31mred"}), 422, "invalid_request"),
    ("c1-control", "POST", URL, js({"question": "next\x85line"}), 422, "invalid_request"),
    # --- ids in the body and headers
    ("session-id-malformed", "POST", URL, js({"question": "ok", "session_id": "not-a-uuid"}),
     400, "invalid_request"),
    ("session-id-number", "POST", URL, js({"question": "ok", "session_id": 7}), 400,
     "invalid_request"),
    ("session-id-unknown", "POST", URL, js({"question": "ok", "session_id": NIL}), 404,
     "not_found"),
    ("idempotency-key-space", "POST", URL, js({"question": "ok"}, {**ALICE,
     "Idempotency-Key": "has space"}), 422, "invalid_request"),
    ("idempotency-key-long", "POST", URL, js({"question": "ok"}, {**ALICE,
     "Idempotency-Key": "k" * 201}), 422, "invalid_request"),
    ("idempotency-key-latin1", "POST", URL, {"json": {"question": "ok"}, "headers": {**ALICE,
     "Idempotency-Key": b"caf\xe9\xff"}}, 422, "invalid_request"),
    ("user-id-latin1", "POST", URL, {"json": {"question": "ok"}, "headers": {
     "X-User-Id": b"al\xefce"}}, 401, "unauthorized"),
    ("no-identity", "POST", URL, js({"question": "ok"}, {}), 401, "unauthorized"),
    ("bad-user-id", "POST", URL, js({"question": "ok"}, {"X-User-Id": "bad id!"}), 401,
     "unauthorized"),
    ("bad-bearer", "POST", URL, js({"question": "ok"}, {"Authorization": "Bearer a.b.c"}), 401,
     "unauthorized"),
    # --- course keys: odd characters, NUL, case, length
    ("course-unknown", "POST", "/v1/courses/nope/questions", js({"question": "hi"}), 404,
     "not_found"),
    ("course-nul", "POST", "/v1/courses/a%00b/questions", js({"question": "hi"}), 404,
     "not_found"),
    ("course-bad-utf8", "POST", "/v1/courses/%ff%fe/questions", js({"question": "hi"}), 404,
     "not_found"),
    ("course-surrogate", "POST", "/v1/courses/a%ED%A0%80/questions", js({"question": "hi"}), 404,
     "not_found"),
    ("course-upper", "POST", "/v1/courses/TEST-COURSE/questions", js({"question": "hi"}), 404,
     "not_found"),
    ("course-long", "POST", f"/v1/courses/{'a' * 5000}/questions", js({"question": "hi"}), 404,
     "not_found"),
    ("course-quote", "POST", "/v1/courses/a'%3B--/questions", js({"question": "hi"}), 404,
     "not_found"),
    ("wrong-method", "PUT", URL, js({"question": "hi"}), 405, "method_not_allowed"),
    # --- reads: job ids, session ids, course keys, cursors and limits
    ("job-malformed", "GET", "/v1/jobs/not-a-uuid", get(), 404, "not_found"),
    ("job-long", "GET", f"/v1/jobs/{'f' * 5000}", get(), 404, "not_found"),
    ("job-unknown", "GET", f"/v1/jobs/{NIL}", get(), 404, "not_found"),
    ("cancel-malformed", "DELETE", "/v1/jobs/%00", get(), 404, "not_found"),
    ("cancel-unknown", "DELETE", f"/v1/jobs/{NIL}", get(), 404, "not_found"),
    ("events-malformed", "GET", "/v1/jobs/zz/events", get(), 404, "not_found"),
    ("events-unknown", "GET", f"/v1/jobs/{NIL}/events", get(), 404, "not_found"),
    ("events-bad-token", "GET", f"/v1/jobs/{NIL}/events?token=%00%ff", {}, 401, "unauthorized"),
    ("messages-malformed", "GET", "/v1/sessions/%ff/messages", get(), 404, "not_found"),
    ("messages-unknown", "GET", f"/v1/sessions/{NIL}/messages", get(), 404, "not_found"),
    ("sessions-no-course", "GET", "/v1/sessions", get(), 400, "invalid_request"),
    ("sessions-course-nul", "GET", "/v1/sessions?course_key=%00", get(), 404, "not_found"),
    ("sessions-course-long", "GET", f"/v1/sessions?course_key={'a' * 5000}", get(), 404,
     "not_found"),
    ("topics-course-nul", "GET", "/v1/courses/%00/topics", get(), 404, "not_found"),
    ("limit-zero", "GET", "/v1/courses/test-course/topics?limit=0", get(), 422, "invalid_request"),
    ("limit-negative", "GET", "/v1/courses/test-course/topics?limit=-1", get(), 422,
     "invalid_request"),
    ("limit-101", "GET", "/v1/courses/test-course/topics?limit=101", get(), 422,
     "invalid_request"),
    ("limit-huge", "GET", f"/v1/courses/test-course/topics?limit={10**30}", get(), 422,
     "invalid_request"),
    ("limit-5000-digits", "GET", f"/v1/sessions?course_key=test-course&limit={'9' * 5000}",
     get(), 400, "invalid_request"),
    ("limit-float", "GET", "/v1/courses/test-course/topics?limit=1.5", get(), 400,
     "invalid_request"),
    ("limit-text", "GET", "/v1/courses/test-course/topics?limit=all", get(), 400,
     "invalid_request"),
    ("cursor-garbage", "GET", "/v1/courses/test-course/topics?cursor=%00%ff", get(), 422,
     "invalid_request"),
    ("cursor-long", "GET", f"/v1/courses/test-course/topics?cursor={'A' * 5000}", get(), 422,
     "invalid_request"),
    ("cursor-not-base64-json", "GET", "/v1/courses/test-course/topics?cursor=bm9wZQ", get(), 422,
     "invalid_request"),
    # A well-formed cursor of another list, and one whose number overflows PostgreSQL's int4.
    ("cursor-other-list", "GET",
     f"/v1/courses/test-course/topics?cursor={encode_cursor_raw(['m', 5])}", get(), 422,
     "invalid_request"),
    ("cursor-int-overflow", "GET",
     f"/v1/courses/test-course/topics?cursor={encode_cursor_raw(['t', 2**31, 1])}", get(), 422,
     "invalid_request"),
    ("messages-cursor-overflow", "GET",
     f"/v1/sessions/{NIL}/messages?cursor={encode_cursor_raw(['m', 2**63])}", get(), 422,
     "invalid_request"),
]  # fmt: skip


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    return error


async def assert_nothing_stored_or_queued(db: Database, arq: ArqRedis) -> None:
    assert await db.fetch_value("SELECT count(*) FROM assistant_jobs") == 0
    assert await db.fetch_value("SELECT count(*) FROM chat_sessions") == 0
    assert await arq.queued_jobs() == []


async def test_bad_input_is_a_4xx_in_one_shape_and_nothing_is_kept(
    client: Client, db: Database, arq: ArqRedis, subtests: pytest.Subtests
) -> None:
    """Every case against one app (a subtest each): besides being quicker than an app
    per case, it shows that no bad request leaves the app or its pools worse off."""
    for name, method, url, kwargs, status, code in CASES:
        with subtests.test(msg=name):
            response = await client.request(method, url, **kwargs)
            assert_error(response, status, code)
            await assert_nothing_stored_or_queued(db, arq)
    # And the app still works.
    ok = await client.post(URL, json={"question": "What is bulk fermentation?"}, headers=ALICE)
    assert ok.status_code == 202, ok.text


async def test_the_messages_say_what_is_wrong(client: Client) -> None:
    async def message(**kwargs: Any) -> str:
        response = await client.post(URL, **kwargs)
        assert 400 <= response.status_code < 500, response.text
        text: str = response.json()["error"]["message"]
        return text

    assert await message(**js({"question": "x" * 70_000})) == (
        "the request body is larger than the limit of 65536 bytes"
    )
    assert await message(**raw(b'{"question": "\xff"}')) == (
        "the body is not valid JSON: it is not UTF-8"
    )
    assert "not valid JSON" in await message(**raw(b'{"question": "\\udc00"}'))
    assert await message(**js({"question": "\U0001f35e" * 1000})) == (
        "the question is 3000 tokens long; the limit is 1000"
    )
    assert await message(**js({"question": "\u200b \u202e"})) == (
        "the question has no visible characters"
    )
    assert await message(**raw(b'{"question": "a\\u0000"}')) == (
        "the question contains the control character U+0000"
    )
    assert "Content-Type: application/json" in await message(**raw(b"{}", ALICE))
    long_key = await client.post(f"/v1/courses/{'a' * 5000}/questions", **js({"question": "q"}))
    assert len(long_key.json()["error"]["message"]) < 200  # the key is not echoed whole


async def test_settings_bound_the_body_and_the_question(
    database_url: str, redis_url: str, db: Database, arq: ArqRedis, client: Client
) -> None:
    settings: Settings = client.app.state.settings
    tight = settings.replace(request_max_bytes=1024, question_max_tokens=5)
    app = create_app(tight, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as small:
        over = await small.post(URL, json={"question": "y" * 1100}, headers=ALICE)
        assert_error(over, 413, "payload_too_large")
        wordy = await small.post(
            URL, json={"question": "one two three four five six"}, headers=ALICE
        )
        error = assert_error(wordy, 422, "invalid_request")
        assert error["details"] == {"limit": 5, "unit": "tokens"}
        ok = await small.post(URL, json={"question": "one two three"}, headers=ALICE)
        assert ok.status_code == 202, ok.text
    assert await db.fetch_value("SELECT count(*) FROM assistant_jobs") == 1


async def test_a_chunked_body_over_the_limit_is_413(
    client: Client, db: Database, arq: ArqRedis
) -> None:
    """Without Content-Length the limit holds while the body streams in (raw ASGI:
    the test client cannot stream a request body)."""
    app: Litestar = client.app
    pieces = [b'{"question": "', *([b"x" * 16_384] * 5), b'"}']
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
        for i, piece in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
            (b"x-user-id", b"alice"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413, body
    assert b'"payload_too_large"' in body
    await assert_nothing_stored_or_queued(db, arq)


@pytest.mark.parametrize(
    ("header", "query"),
    [
        ("bogus", None),
        ("99999999999999999999999-0", None),  # over 64 bits
        ("18446744073709551616-0", None),  # 2**64
        ("1-18446744073709551616", None),
        ("1-2-3", None),
        ("-1-0", None),
        ("\xe9\xff", None),
        (None, "99999999999999999999999-0"),
        (None, "1" * 5000 + "-0"),
        (None, "%00"),
    ],
)
async def test_a_bogus_last_event_id_is_422(
    client: Client, arq: ArqRedis, header: str | None, query: str | None
) -> None:
    asked = await client.post(URL, json={"question": "What is bulk?"}, headers=ALICE)
    job_id = asked.json()["job_id"]
    url = f"/v1/jobs/{job_id}/events"
    headers: dict[str, Any] = dict(ALICE)
    if header is not None:
        headers["Last-Event-ID"] = header.encode("latin-1")
    if query is not None:
        url += f"?last_event_id={query}"
    response = await client.get(url, headers=headers)
    error = assert_error(response, 422, "invalid_request")
    assert "Last-Event-ID" in error["message"]
    assert len(await arq.queued_jobs()) == 1  # only the question asked above


async def test_a_valid_but_foreign_cursor_only_moves_within_the_callers_list(
    client: Client,
) -> None:
    forged = encode_cursor(TopicKey(module_number=0, position=0))
    response = await client.get(f"/v1/courses/test-course/topics?cursor={forged}", headers=ALICE)
    assert response.status_code == 200
    assert [t["topic_key"] for t in response.json()["items"]]
    other = await client.get(
        f"/v1/sessions/{uuid.uuid4()}/messages?cursor={encode_cursor_raw(['m', 1])}",
        headers=ALICE,
    )
    assert_error(other, 404, "not_found")
