"""TRACING=otlp in the real processes: the API's and the worker's spans of a question
reach an OTLP/HTTP collector (a small one here) as one trace."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from devtools.embedded import free_port
from devtools.processes import running_service
from tests.e2e.test_service import ask, poll
from tests.fixtures.fake_openai import FakeServer

pytestmark = pytest.mark.timeout(120)


class Collector:
    """Accepts OTLP/HTTP protobuf exports on /v1/traces and keeps the spans."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, bytes, bytes, bytes]] = []  # service, name, ids
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in resource.resource.attributes
                        if a.key == "service.name"
                    )
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            collector.spans.append(
                                (service, span.name, span.trace_id, span.span_id,
                                 span.parent_span_id)
                            )  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def collector() -> Iterator[Collector]:
    started = Collector()
    started.thread.start()
    try:
        yield started
    finally:
        started.server.shutdown()
        started.server.server_close()


async def test_the_processes_export_one_trace_per_question(
    demo_env: dict[str, str], collector: Collector, fake_openai: FakeServer
) -> None:
    env = {**demo_env, "TRACING": "otlp", "OTLP_ENDPOINT": collector.url}
    with running_service(env, port=free_port()) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
            accepted = await ask(http, "Why does dough rise?")
            assert (await poll(http, accepted["job_id"]))["status"] == "succeeded"
    # Stopping the processes flushed their batched spans.
    named = {(service_name, name): (trace, span, parent)
             for service_name, name, trace, span, parent in collector.spans}  # fmt: skip
    request = named[("course-assistant-api", "POST /v1/courses/{course_key}/questions")]
    enqueue = named[("course-assistant-api", "enqueue")]
    job = named[("course-assistant-worker", "answer_question")]
    assert enqueue[2] == request[1]  # parent: the request
    assert job[2] == enqueue[1] and job[0] == request[0]  # the same trace, through the queue
    stages = {name for (svc, name), ids in named.items() if ids[2] == job[1]}
    assert {"queue_wait", "embed", "retrieve", "generate"} <= stages, stages
