"""Prometheus metrics, defined in one place for every process.

Each process keeps its own (prometheus-client's default registry, with its process
collector: CPU seconds, memory, open descriptors). The API serves them at
``/metrics``, with the HTTP metrics of Litestar's Prometheus middleware
(``course_assistant_requests_total`` and ``..._request_duration_seconds`` by method,
path template and status); each worker serves its own on ``WORKER_METRICS_PORT``
(one port per worker process, see the Procfile). Per-process ports rather than
prometheus-client's multiprocess mode: the processes are separate programs, not
forks of one, and Prometheus scrapes each as its own target.

Values that live elsewhere (queue depth in Redis, breaker state in Redis, pool use in
the pool) are read when scraped: the API's ``/metrics`` refreshes them first
(:func:`refresh`), and the pool collectors read their pool's stats in ``collect``.

``deploy/alerts.yml`` and ``deploy/grafana-dashboard.json`` use these names; a test
checks that every metric they name is defined here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import ConnectionPool as RedisPool
from redis.asyncio import Redis

PREFIX = "course_assistant"

#: Seconds: from a Redis round trip to a long generation.
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

JOBS = Counter(
    f"{PREFIX}_jobs_total",
    "Questions finished by workers, by outcome (succeeded, failed, cancelled), how an "
    "answer was served (generated, semantic_cache, followed; '' when none was) and "
    "error code ('' on success).",
    ["status", "served_by", "error"],
)
STAGES = Histogram(
    f"{PREFIX}_stage_seconds",
    "Time a question spent in each stage of the worker's pipeline: rewrite, embed, "
    "modules, retrieve, verify, first_token, generate, total.",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
CACHE_LOOKUPS = Counter(
    f"{PREFIX}_semantic_cache_lookups_total",
    "Semantic cache lookups: hit, miss (no candidate close enough) or refused (a "
    "candidate was close enough but a check said no), with the check: threshold, "
    "slots, evidence, verifier.",
    ["result", "reason"],
)
PROVIDER_CALLS = Counter(
    f"{PREFIX}_provider_calls_total",
    "Calls to the model provider by operation (embeddings, chat, short_reply), model "
    "and status (ok, or the HTTP status or error class of a failed attempt).",
    ["operation", "model", "status"],
)
PROVIDER_TOKENS = Counter(
    f"{PREFIX}_provider_tokens_total",
    "Tokens the model provider reported, by model and kind (prompt, completion).",
    ["model", "kind"],
)
BREAKER_STATE = Gauge(
    f"{PREFIX}_breaker_state",
    "The provider circuit breaker of each operation: 0 closed, 1 half open, 2 open "
    "(read from Redis when the API is scraped).",
    ["operation"],
)
RATE_LIMITED = Counter(
    f"{PREFIX}_rate_limit_refusals_total",
    "Requests refused by a limit, by limit (questions_user, questions_course, reads, "
    "queue_depth, inflight, event_streams).",
    ["limit"],
)
SSE_STREAMS = Gauge(f"{PREFIX}_sse_streams_open", "Event streams open in this API process.")
QUEUE_DEPTH = Gauge(
    f"{PREFIX}_queue_depth", "Questions waiting in the queue (read when the API is scraped)."
)
QUEUE_OLDEST_AGE = Gauge(
    f"{PREFIX}_queue_oldest_age_seconds",
    "Age of the oldest question waiting in the queue, 0 when none waits.",
)
RECONCILER_REQUEUES = Counter(
    f"{PREFIX}_reconciler_requeues_total",
    "Jobs the reconciler found lost and queued again.",
)
RECONCILER_EXHAUSTED = Counter(
    f"{PREFIX}_reconciler_exhausted_total",
    "Jobs the reconciler failed because they ran out of attempts.",
)

_BREAKER_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


def job_finished(status: str, served_by: str | None = None, error: str | None = None) -> None:
    JOBS.labels(status, served_by or "", error or "").inc()


def stage_timings(timings: Mapping[str, float]) -> None:
    """Observe a job's ``*_ms`` timings (``assistant_jobs.timings``) as stages."""
    for name, value in timings.items():
        if name.endswith("_ms"):
            STAGES.labels(name[:-3]).observe(value / 1000)


def provider_call(operation: str, model: str, status: str) -> None:
    PROVIDER_CALLS.labels(operation, model, status).inc()


def provider_tokens(model: str, prompt: int, completion: int) -> None:
    if prompt:
        PROVIDER_TOKENS.labels(model, "prompt").inc(prompt)
    if completion:
        PROVIDER_TOKENS.labels(model, "completion").inc(completion)


def breaker_state(operation: str, state: str) -> None:
    BREAKER_STATE.labels(operation).set(_BREAKER_VALUES.get(state, -1.0))


async def refresh_queue(redis: Redis, queue: str) -> None:
    """Queue depth and the oldest waiting job's age: arq keeps its queue as a sorted
    set scored by when each job may run (milliseconds); one pipelined round trip."""
    now_ms = time.time() * 1000
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(queue, "-inf", now_ms)
        pipe.zrangebyscore(queue, "-inf", now_ms, start=0, num=1, withscores=True)
        depth, oldest = await pipe.execute()
    QUEUE_DEPTH.set(depth)
    QUEUE_OLDEST_AGE.set(max(0.0, (now_ms - oldest[0][1]) / 1000) if oldest else 0.0)


class PoolCollector(Collector):
    """Database and Redis pool use of this process, read from the pools when scraped."""

    def __init__(self, db_pool: AsyncConnectionPool[Any], redis_pool: RedisPool) -> None:
        self.db_pool = db_pool
        self.redis_pool = redis_pool

    def collect(self) -> Iterable[Metric]:
        stats = self.db_pool.get_stats()
        size = stats.get("pool_size", 0)
        available = stats.get("pool_available", 0)
        connections = GaugeMetricFamily(
            f"{PREFIX}_db_pool_connections",
            "Database pool connections by state (in_use, idle) and the pool's maximum.",
            labels=["state"],
        )
        connections.add_metric(["in_use"], size - available)
        connections.add_metric(["idle"], available)
        connections.add_metric(["max"], self.db_pool.max_size)
        yield connections
        yield GaugeMetricFamily(
            f"{PREFIX}_db_pool_waiting",
            "Requests waiting for a database connection now.",
            value=stats.get("requests_waiting", 0),
        )
        waited = CounterMetricFamily(
            f"{PREFIX}_db_pool_wait_seconds",
            "Seconds requests spent waiting for a database connection, in all.",
        )
        waited.add_metric([], stats.get("requests_wait_ms", 0) / 1000)
        yield waited
        requests = CounterMetricFamily(
            f"{PREFIX}_db_pool_requests", "Connections requested from the database pool."
        )
        requests.add_metric([], stats.get("requests_num", 0))
        yield requests
        # redis-py exposes no public counters; its pool's two lists are what it uses
        # itself (read only, under the GIL: a consistent enough snapshot for a gauge).
        in_use = len(getattr(self.redis_pool, "_in_use_connections", ()))
        idle = len(getattr(self.redis_pool, "_available_connections", ()))
        redis = GaugeMetricFamily(
            f"{PREFIX}_redis_pool_connections",
            "Redis pool connections by state (in_use, idle) and the pool's maximum.",
            labels=["state"],
        )
        redis.add_metric(["in_use"], in_use)
        redis.add_metric(["idle"], idle)
        redis.add_metric(["max"], self.redis_pool.max_connections)
        yield redis


_pools: list[PoolCollector] = []


def watch_pools(db_pool: AsyncConnectionPool[Any], redis_pool: RedisPool) -> None:
    """Report these pools (the process's own) from now on; the previous ones are
    dropped (a test builds many apps in one process)."""
    for old in _pools:
        REGISTRY.unregister(old)
    _pools.clear()
    collector = PoolCollector(db_pool, redis_pool)
    REGISTRY.register(collector)
    _pools.append(collector)
