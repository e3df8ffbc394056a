from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from devtools.embedded import free_port
from rag.platform.settings import Settings
from rag.protection.breaker import provider_breakers

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def client(settings: Settings, database_url: str, redis_url: str) -> AsyncIterator[Client]:
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


async def test_health_answers_without_io(client: Client) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_checks_database_redis_and_schema(
    client: Client,
) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "redis": "ok"},
        "provider": {"name": "offline"},
    }


async def test_ready_is_503_with_a_reason_on_an_unmigrated_database(
    settings: Settings,
    empty_database_url: str,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(settings, database_url=empty_database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        # Start-up already said what is wrong and how to fix it.
        assert "not ready: the database is missing migrations" in caplog.text
        response = await client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert "python -m workers migrate" in body["checks"]["database"]
    assert body["checks"]["redis"] == "ok"


async def test_unknown_routes_use_the_error_shape(
    client: Client,
) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "Not Found", "details": {}}
    }
    response = await client.post("/health")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_the_page_and_the_openapi_schema_are_served(
    client: Client,
) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and "Course Assistant" in page.text
    assert 'src="/static/assistant.js"' in page.text
    schema = await client.get("/schema/openapi.json")
    assert schema.status_code == 200
    assert "/ready" in schema.json()["paths"]


async def test_the_widget_its_libraries_the_demo_lesson_and_a_favicon_are_served(
    client: Client,
) -> None:
    # Module scripts: a browser refuses one served with a type that is not JavaScript.
    for path in ("/static/assistant.js", "/static/vendor/marked.esm.js",
                 "/static/vendor/purify.es.mjs"):  # fmt: skip
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].split(";")[0] == "text/javascript", path
    lesson = await client.get("/demo/lesson")
    assert lesson.status_code == 200 and "<course-assistant" in lesson.text
    icon = await client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"


async def test_cors_admits_the_configured_origins_only(
    settings: Settings, database_url: str, redis_url: str
) -> None:
    # Without CORS_ORIGINS a preflight gets no grant: same origin only.
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key",
    }
    plain = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=plain) as client:
        response = await client.options(
            "/v1/courses/x/questions", headers={"Origin": "https://lms.example.edu", **preflight}
        )
        assert "access-control-allow-origin" not in response.headers
    embedded = settings.replace(cors_origins=("https://lms.example.edu",))
    app = create_app(embedded, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        allowed = await client.options(
            "/v1/courses/x/questions", headers={"Origin": "https://lms.example.edu", **preflight}
        )
        assert allowed.status_code in (200, 204), allowed.text
        assert allowed.headers["access-control-allow-origin"] == "https://lms.example.edu"
        granted = allowed.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "idempotency-key"} <= {
            h.strip() for h in granted.split(",")
        }
        other = await client.options(
            "/v1/courses/x/questions", headers={"Origin": "https://evil.example", **preflight}
        )
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        # The widget's own script is readable cross-origin (a module script needs it).
        script = await client.get(
            "/static/assistant.js", headers={"Origin": "https://lms.example.edu"}
        )
        assert script.headers["access-control-allow-origin"] == "https://lms.example.edu"


async def test_ready_says_what_is_down_but_not_where(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    database_url = f"postgresql://nobody@127.0.0.1:{port}/nothing?connect_timeout=1"
    redis_url = f"redis://127.0.0.1:{port}/0"
    # The API starts all the same (an orchestrator sees "not ready", not a crash loop).
    settings = settings.replace(db_pool_timeout=0.5)
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "unreachable", "redis": "unreachable"},
        "provider": {"name": "offline"},
    }
    # The operator finds the driver's words in the log.
    assert f"not ready: redis: Error 111 connecting to 127.0.0.1:{port}" in caplog.text
    assert "not ready: database: " in caplog.text


async def test_ready_answers_within_a_second_when_postgresql_is_down(
    settings: Settings, redis_url: str
) -> None:
    """At the default pool timeout (5 s) a readiness probe used to wait for a pooled
    connection that never came; orchestrators probe with a 1 s timeout."""
    database_url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        for _ in range(3):
            began = time.monotonic()
            response = await client.get("/ready")
            took = time.monotonic() - began
            assert response.status_code == 503
            assert response.json()["checks"] == {"database": "unreachable", "redis": "ok"}
            assert took < 1.0, took


async def test_ready_reports_the_providers_breakers_without_calling_it(
    settings: Settings, database_url: str, redis_url: str, redis_client: Any
) -> None:
    """An open breaker shows in /ready, which stays 200: cached answers and reads
    still work while the provider is down."""
    remote = settings.replace(
        provider="openai", openai_api_key="sk-test", openai_base_url="http://127.0.0.1:9/v1"
    )
    breakers = provider_breakers(remote, redis_client)
    for _ in range(remote.breaker_failures):
        await breakers["chat"].failure(await breakers["chat"].admit())
    app = create_app(remote, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json()["provider"] == {
        "name": "openai",
        "chat": "open",
        "embeddings": "closed",
    }
