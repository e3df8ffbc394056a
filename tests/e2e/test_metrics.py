"""Prometheus metrics of the API and of a worker, scraped from the running processes."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.embedded import free_port
from devtools.processes import Service
from tests.e2e.test_service import ALICE, ask, poll
from tests.fixtures.fake_openai import FakeServer

pytestmark = pytest.mark.timeout(180)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_the_api_and_a_worker_count_what_a_question_did(
    start: Callable[..., Service], fake_openai: FakeServer
) -> None:
    port = free_port()
    service = start(WORKER_METRICS_PORT=str(port), RATE_READS_PER_MINUTE="0")
    api_url, worker_url = f"{service.base_url}/metrics", f"http://127.0.0.1:{port}/metrics"
    api0, worker0 = scrape(api_url), scrape(worker_url)
    await fake_openai.aconfigure(answer="Knead until the dough passes the windowpane test [1].")

    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
        first = await ask(http, "How long should I knead bread dough?")
        assert (await poll(http, first["job_id"]))["served_by"] == "generated"
        second = await ask(http, "How long should I knead bread dough?")
        assert (await poll(http, second["job_id"]))["served_by"] == "semantic_cache"
        unknown = await http.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=ALICE)
        assert unknown.status_code == 404

    api, worker = scrape(api_url), scrape(worker_url)

    def moved(samples: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    # The API: requests by route template and status, the queue, pools, streams.
    asked = {"method": "POST", "path": "/v1/courses/{course_key}/questions"}
    assert moved(api, api0, "course_assistant_requests_total", **asked, status_code="202") == 2
    assert moved(api, api0, "course_assistant_requests_total", status_code="404") == 1
    assert moved(api, api0, "course_assistant_request_duration_seconds_count", **asked) == 2
    assert ("course_assistant_queue_depth", frozenset()) in api
    assert value(api, "course_assistant_queue_oldest_age_seconds") >= 0
    assert value(api, "course_assistant_db_pool_connections", state="max") == 8
    assert value(api, "course_assistant_redis_pool_connections", state="max") > 0
    assert ("course_assistant_sse_streams_open", frozenset()) in api
    assert value(api, "course_assistant_breaker_state", operation="chat") == 0  # closed
    # The worker: outcomes, stages, the cache, the provider and its tokens.
    jobs = "course_assistant_jobs_total"
    assert moved(worker, worker0, jobs, status="succeeded", served_by="generated") == 1
    assert moved(worker, worker0, jobs, status="succeeded", served_by="semantic_cache") == 1
    stage = "course_assistant_stage_seconds_count"
    assert moved(worker, worker0, stage, stage="total") == 2
    assert moved(worker, worker0, stage, stage="embed") == 2
    assert moved(worker, worker0, stage, stage="first_token") == 1
    assert moved(worker, worker0, stage, stage="generate") == 1
    cache = "course_assistant_semantic_cache_lookups_total"
    assert moved(worker, worker0, cache, result="hit") == 1
    assert moved(worker, worker0, cache, result="miss", reason="threshold") == 1
    calls = "course_assistant_provider_calls_total"
    assert moved(worker, worker0, calls, operation="chat", status="ok") == 1
    assert moved(worker, worker0, calls, operation="embeddings", status="ok") >= 1
    assert moved(worker, worker0, "course_assistant_provider_tokens_total", kind="completion") > 0
    assert value(worker, "process_cpu_seconds_total") > 0
    assert value(worker, "course_assistant_db_pool_connections", state="max") == 8


async def test_failed_provider_calls_and_refused_requests_are_counted(
    start: Callable[..., Service], fake_openai: FakeServer
) -> None:
    port = free_port()
    service = start(
        WORKER_METRICS_PORT=str(port),
        RATE_QUESTIONS_PER_MINUTE="1",
        RATE_QUESTIONS_BURST="1",
        PROVIDER_MAX_ATTEMPTS="2",
    )
    await fake_openai.aadd_faults(
        {"endpoint": "embeddings", "kind": "status", "status": 503, "times": 100}
    )
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
        accepted = await ask(http, "Why did my loaf collapse?")
        job = await poll(http, accepted["job_id"])
        assert job["error"]["code"] == "provider_unavailable"
        refused = await http.post(
            "/v1/courses/bread-science/questions", json={"question": "And now?"}, headers=ALICE
        )
        assert refused.status_code == 429
    api, worker = scrape(f"{service.base_url}/metrics"), scrape(f"http://127.0.0.1:{port}/metrics")
    refusals = "course_assistant_rate_limit_refusals_total"
    assert value(api, refusals, limit="questions_user") == 1
    assert value(worker, "course_assistant_provider_calls_total", status="503") == 2  # 2 attempts
    failed = "course_assistant_jobs_total"
    assert value(worker, failed, status="failed", error="provider_unavailable") == 1
