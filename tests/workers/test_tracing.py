"""A question's trace: the API's request span, its enqueue span, and the worker's spans
continuing the same trace through the queue (the SDK's in-memory exporter)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from api.app import create_app
from rag.platform import tracing
from rag.platform.resources import Resources
from rag.platform.settings import Settings
from tests.workers.test_answers import _run_worker, setup  # noqa: F401 - setup: a fixture

Client = AsyncTestClient[Litestar]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)
        provider.shutdown()


@pytest.fixture
async def client(
    setup: tuple[Settings, Resources],  # noqa: F811
    database_url: str,
    redis_url: str,
) -> AsyncIterator[Client]:
    app = create_app(setup[0], database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


async def test_a_question_is_one_trace_from_the_post_to_the_workers_stages(
    client: Client,
    spans: InMemorySpanExporter,
    setup: tuple[Settings, Resources],  # noqa: F811
    redis_url: str,
) -> None:
    response = await client.post(
        "/v1/courses/bread-science/questions",
        json={"question": "Why does bread need salt?"},
        headers={"X-User-Id": "ann"},
    )
    assert response.status_code == 202, response.text
    await _run_worker(setup[1], redis_url)

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    by_name = {span.name: span for span in finished}
    request = by_name["POST /v1/courses/{course_key}/questions"]
    enqueue, job = by_name["enqueue"], by_name["answer_question"]
    assert request.kind == SpanKind.SERVER and job.kind == SpanKind.CONSUMER
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 202
    trace_id = request.context.trace_id
    # The enqueue is the request's child; the worker's span continues the trace from it.
    assert enqueue.parent is not None and enqueue.parent.span_id == request.context.span_id
    assert job.parent is not None and job.parent.span_id == enqueue.context.span_id
    assert job.context.trace_id == trace_id
    assert job.attributes is not None and job.attributes["job.id"] == response.json()["job_id"]
    # Each stage is a child of the worker's span, inside its time.
    stages = [
        s for s in finished if s.parent is not None and s.parent.span_id == job.context.span_id
    ]
    names = {s.name for s in stages}
    assert {"queue_wait", "embed", "retrieve", "generate"} <= names, names
    for stage in stages:
        assert stage.context.trace_id == trace_id
        assert stage.end_time is not None and stage.start_time is not None
        assert stage.start_time <= stage.end_time
        if stage.name != "queue_wait":  # the wait began before the job's span
            assert job.start_time is not None and job.end_time is not None
            assert job.start_time <= stage.start_time and stage.end_time <= job.end_time


async def test_nothing_is_recorded_or_propagated_with_tracing_off(client: Client) -> None:
    assert tracing.carrier() == {}
    response = await client.get("/v1/courses", headers={"X-User-Id": "ann"})
    assert response.status_code == 200
    assert tracing.carrier() == {}
