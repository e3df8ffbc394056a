"""``create_app(settings, ...)`` builds the Litestar application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from arq.connections import ArqRedis
from litestar import Litestar, MediaType, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.plugins.prometheus import PrometheusConfig
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import admin, insights, lists, progress, questions
from api.bodies import ApiRequest
from api.errors import handle_exception
from api.limits import rate_limit_headers
from rag.answering.events import EventLog, StreamHub
from rag.answering.queue import QUEUE_NAME
from rag.content.catalog import CourseCatalog, Enrollments, follow_changes
from rag.platform import metrics, tracing
from rag.platform.errors import AssistantError, DimensionMismatch, SchemaError
from rag.platform.logs import REQUEST_ID, REQUEST_ID_PATTERN
from rag.platform.redis import create_pool, create_redis
from rag.platform.resources import Resources, open_resources
from rag.platform.settings import Settings
from rag.protection.auth import Authenticator
from rag.protection.breaker import CircuitBreaker, provider_breakers
from rag.protection.limits import Limiter

log = logging.getLogger("api")
STATIC = Path(__file__).resolve().parent / "static"
#: Seconds start-up waits for the cache-change feed to subscribe.
FEED_START_WAIT = 2.0


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    status: str
    checks: dict[str, str]
    #: The model provider, and for a remote one the state of its circuit breakers
    #: (closed, open, half_open), read from Redis: no provider call. Not part of
    #: ``status``: while the provider is down the API still serves (cached answers,
    #: reads), and an orchestrator must not take it out of rotation for it.
    provider: dict[str, str]


@get("/health", summary="Liveness: the process answers (no I/O)", sync_to_thread=False)
def health() -> Health:
    return Health("ok")


#: Seconds each readiness check may take: /ready answers within a second even when
#: a server is down (the pool would otherwise wait DB_POOL_TIMEOUT for a connection).
READY_TIMEOUT = 0.8


@get("/ready", summary="Readiness: database, Redis and schema are usable")
async def ready(state: State) -> Response[Readiness]:
    res: Resources = state.res
    # Both checks at once, each bounded. The body says what is wrong, not where: driver
    # errors name hosts and ports, so they go to the log. A schema problem is safe to
    # show and says how to fix it.
    database, redis, provider = await asyncio.gather(
        _check_database(res), _check_redis(res), _provider_state(state)
    )
    checks = {"database": database, "redis": redis}
    ok = all(v == "ok" for v in checks.values())
    return Response(
        Readiness("ok" if ok else "unavailable", checks, provider),
        status_code=200 if ok else 503,
    )


async def _provider_state(state: State) -> dict[str, str]:
    settings: Settings = state.settings
    out: dict[str, str] = {"name": settings.provider_kind}
    breakers: dict[str, CircuitBreaker] = state.breakers
    for operation, breaker in breakers.items():
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                out[operation] = (await breaker.status()).state
        except Exception as exc:  # Redis trouble: /ready's redis check reports it
            log.warning("not ready: breaker %s: %s", breaker.name, exc or "timed out")
            out[operation] = "unknown"
    return out


async def _check_database(res: Resources) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await res.db.check_schema()
    except SchemaError as exc:
        return exc.message
    except (AssistantError, TimeoutError) as exc:
        log.warning("not ready: database: %s", getattr(exc, "message", "timed out"))
        return "unreachable"
    return "ok"


async def _check_redis(res: Resources) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await res.redis.ping()
    except Exception as exc:  # any Redis failure means not ready, whatever its type
        log.warning("not ready: redis: %s", exc or "timed out")
        return "unreachable"
    return "ok"


#: Seconds /metrics waits for each value it reads from Redis before it answers without it.
METRICS_READ_TIMEOUT = 0.5


@get("/metrics", include_in_schema=False)
async def prometheus_metrics(state: State) -> Response[bytes]:
    """Prometheus text format (rag/platform/metrics.py). Queue depth and age, breaker
    states and open streams are read now, each bounded: a scrape during a Redis
    outage still answers, with the values it could read."""
    res: Resources = state.res
    hub: StreamHub = state.streams
    metrics.SSE_STREAMS.set(hub.open_streams)
    try:
        async with asyncio.timeout(METRICS_READ_TIMEOUT):
            await metrics.refresh_queue(res.redis, QUEUE_NAME)
        breakers: dict[str, CircuitBreaker] = state.breakers
        for operation, breaker in breakers.items():
            async with asyncio.timeout(METRICS_READ_TIMEOUT):
                metrics.breaker_state(operation, (await breaker.status()).state)
    except Exception as exc:  # Redis trouble: /ready reports it; the rest is served
        log.warning("metrics: values kept in Redis not read: %s", exc or "timed out")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@get("/", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=False)
def index() -> Response[bytes]:
    """The chat page: the widget (``static/assistant.js``) filling the window."""
    return Response((STATIC / "index.html").read_bytes(), media_type=MediaType.HTML)


@get("/demo/lesson", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=False)
def demo_lesson() -> Response[bytes]:
    """A course platform's lesson page with the widget embedded as the README shows."""
    return Response((STATIC / "lesson.html").read_bytes(), media_type=MediaType.HTML)


@get("/favicon.ico", include_in_schema=False, sync_to_thread=False)
def favicon() -> Response[bytes]:
    """Browsers ask for it whatever the page says; an SVG, not a 404 in the console."""
    return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml")


def request_ids(app: ASGIApp) -> ASGIApp:
    """Middleware: the request's id (``X-Request-ID`` when the client sent a usable
    one, else a new one) in the logging context while it is handled, handed to the
    worker with a question's job (``rag/platform/logs.py``), a server span when traced,
    and one ``api.access`` line when the response starts: method, path template,
    status, milliseconds."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        method = scope["method"]
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        scope.setdefault("state", {})[_REQUEST_ID] = request_id
        started = time.perf_counter()
        route = scope.get("path_template", scope["path"])
        span_context = tracing.tracer().start_as_current_span(
            f"{method} {route}",
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "http.route": route,
                "request.id": request_id,
            },
        )

        # Probes and scrapes come every few seconds: their lines only at debug level.
        level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                access.log(
                    level,
                    "%s %s %s",
                    method,
                    route,
                    message["status"],
                    extra={
                        "method": method,
                        "path": route,
                        "status": message["status"],
                        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
            await send(message)

        try:
            with span_context as span:
                await app(scope, receive, logged_send)
        finally:
            REQUEST_ID.reset(token)

    return middleware


_REQUEST_ID = "request_id"
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
access = logging.getLogger("api.access")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if REQUEST_ID_PATTERN.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


async def request_id_header(message: Message, scope: Scope) -> None:
    """A ``before_send`` hook: every response says its request id (a 404 for a path no
    route matched never met the middleware, and gets a fresh one)."""
    if message["type"] == "http.response.start":
        state = scope.setdefault("state", {})
        request_id = state.get(_REQUEST_ID) or state.setdefault(_REQUEST_ID, uuid.uuid4().hex)
        message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]


def cors_config(settings: Settings) -> CORSConfig | None:
    """What a page of another origin (a course platform embedding the widget) may send
    and read; None when ``CORS_ORIGINS`` is empty (same origin only)."""
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "Idempotency-Key",
            "Last-Event-ID",
            *(["X-User-Id"] if settings.dev_identity_header else []),
        ],
        expose_headers=[
            "Retry-After",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
            "X-Request-ID",
        ],
        # The widget sends the learner's token in a header, never a cookie.
        allow_credentials=False,
        max_age=600,
    )


def create_app(settings: Settings, *, database_url: str, redis_url: str) -> Litestar:
    """The API. Its lifespan opens the pool, Redis and the provider, and closes them in reverse."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # The API serves /ready even on a database that needs migrating, so that
        # an orchestrator sees "not ready" with a reason instead of a crash loop.
        # One Redis pool for the process: arq's client for enqueueing is also the
        # client for caches and event streams.
        arq = ArqRedis(create_pool(settings, redis_url))
        async with open_resources(
            settings, database_url=database_url, redis=arq, check_schema=False
        ) as res:
            try:
                await res.db.check_schema()
            except DimensionMismatch as exc:
                # Not something /ready can wait out: refuse, as the worker and CLI do.
                log.error("error: %s", exc.message)
                raise
            except AssistantError as exc:
                # Migrations missing, or the database down: say it at start-up (a
                # schema error with its fix), then serve anyway and let /ready keep
                # saying it, rather than exit into a restart loop (the pool reconnects).
                log.error("not ready: %s", exc.message)
            app.state.res = res
            app.state.arq = arq
            app.state.catalog = catalog = CourseCatalog(res.db, settings.course_cache_ttl)
            app.state.enrollments = enrollments = Enrollments(res.db, settings.enrollment_cache_ttl)
            app.state.events = EventLog(res.redis)
            # Event streams wait on a connection of their own, never on the pool's
            # (rag/answering/events.py, StreamHub): open streams cannot starve other routes.
            app.state.streams = streams = StreamHub(
                create_redis(settings, redis_url, max_connections=1),
                res.redis,
                max_streams=settings.sse_max_streams,
                max_per_user=settings.sse_max_streams_per_user,
            )
            streams.start()
            app.state.limiter = Limiter(res.redis)
            app.state.breakers = (
                provider_breakers(settings, res.redis) if settings.provider_kind == "openai" else {}
            )
            subscribed = asyncio.Event()
            feed = asyncio.create_task(
                follow_changes(catalog, enrollments, res.redis, subscribed=subscribed),
                name="cache-changes",
            )
            # Serve once the feed stands (one round trip), or after a moment if
            # Redis is down: /ready reports that, and the feed keeps retrying.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(subscribed.wait(), FEED_START_WAIT)
            try:
                yield
            finally:
                await streams.aclose()
                feed.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed

    handlers: list[Any] = [
        *questions.ROUTES,
        *lists.ROUTES,
        *progress.ROUTES,
        *insights.ROUTES,
        *admin.ROUTES,
        health,
        ready,
        prometheus_metrics,
        index,
        demo_lesson,
        favicon,
        create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False),
    ]
    return Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        before_send=[rate_limit_headers, request_id_header],
        # Requests by method, path template and status, and their latency (Litestar's
        # middleware over prometheus-client); unmatched paths are not counted, so a
        # scan of random URLs cannot grow the label set.
        middleware=[
            request_ids,
            PrometheusConfig(
                app_name="api",
                prefix=metrics.PREFIX,
                group_path=True,
                exclude_unhandled_paths=True,
                exclude=["/metrics", "/health"],
            ).middleware
        ],
        cors_config=cors_config(settings),
        # Bodies beyond the limit answer 413 before they are read whole; the request
        # class makes every body the client got wrong a 4xx (api/bodies.py).
        request_max_body_size=settings.request_max_bytes,
        request_class=ApiRequest,
        openapi_config=OpenAPIConfig(
            title="Course Assistant",
            version="0.1.0",
            description="Course-grounded answers, queued and streamed.",
            path="/schema",
            render_plugins=[ScalarRenderPlugin()],
        ),
        # Built here, not in the lifespan: a bad key stops start-up at once.
        state=State({"settings": settings, "auth": Authenticator(settings)}),
        debug=False,
        # Logging is the process's business (python -m api configures it), not
        # the app's: Litestar's default would install queue handlers on the root
        # logger of every process that builds an app, tests included.
        logging_config=None,
    )
