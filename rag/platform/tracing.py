"""OpenTelemetry traces of a question, from the POST through the queue to the worker's
stages. Off by default (``TRACING=off``: a no-op tracer, nothing recorded);
``TRACING=otlp`` exports spans over OTLP/HTTP to ``OTLP_ENDPOINT``.

The API opens a server span per request (``api/app.py``) and a child ``enqueue``
span when it queues a question; the W3C trace context of that span travels in the
job's arguments (:func:`carrier`), and the worker continues it
(:func:`continued`): an ``answer_question`` span with a ``queue_wait`` span (from
the job's creation to its start) and one span per stage it timed (rewrite, embed,
modules, retrieve, verify, generate), made from the same clock readings as the
job's ``timings``.

The tracer is this module's own (:func:`use`), not the process-global provider:
tests install an in-memory exporter for a while and take it away again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Tracer

from rag.platform.settings import Settings

log = logging.getLogger("rag.tracing")
_NAME = "course_assistant"
_tracer: Tracer = trace.NoOpTracer()


def use(provider: TracerProvider | None) -> None:
    """Record spans with ``provider`` from now on (None: record nothing)."""
    global _tracer
    _tracer = provider.get_tracer(_NAME) if provider is not None else trace.NoOpTracer()


def tracer() -> Tracer:
    return _tracer


def configure_tracing(settings: Settings, process: str) -> TracerProvider | None:
    """The process's provider, exporting by OTLP, when ``TRACING=otlp``; shut it down
    on exit to flush what is batched."""
    if settings.tracing == "off":
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"course-assistant-{process}"})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(settings.otlp_endpoint)))
    use(provider)
    log.info("tracing: spans exported to %s", settings.otlp_endpoint)
    return provider


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``), for a job's arguments;
    empty when nothing is traced."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


@contextlib.contextmanager
def continued(
    headers: Mapping[str, str] | None, name: str, attributes: Mapping[str, Any]
) -> Iterator[Span]:
    """A consumer span continuing the trace in ``headers`` (a new trace without them)."""
    context = propagate.extract(dict(headers or {}))
    with _tracer.start_as_current_span(
        name, context=context, kind=SpanKind.CONSUMER, attributes=dict(attributes)
    ) as span:
        yield span


def _wall_ns(perf: float) -> int:
    """A ``time.perf_counter()`` reading as wall-clock nanoseconds (for span times)."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def record_stage(name: str, started: float, ended: float) -> None:
    """A child span of the current one, for a stage timed with ``perf_counter``."""
    span = _tracer.start_span(name, start_time=_wall_ns(started))
    span.end(end_time=_wall_ns(ended))


def record_span(name: str, start_ns: int, end_ns: int) -> None:
    """A child span of the current one between two wall-clock times (nanoseconds)."""
    span = _tracer.start_span(name, start_time=start_ns)
    span.end(end_time=end_ns)
