"""Asking questions and reading their jobs.

``POST`` writes the durable job row, then enqueues the arq job with the same
id, and answers ``202`` at once: the request path never waits on a model. It
costs one database round trip (session and job in one statement; the course
key comes from a TTL cache) and one enqueue (arq: a pipelined check-and-add).
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, cast

import msgspec
from litestar import HttpMethod, Litestar, Request, Response, delete, get, post, route
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.bodies import require_json
from api.errors import error_responses
from api.identity import current_identity, current_user, require_enrollment, stream_user
from api.limits import admit_question, reading
from rag.answering.events import EventLog, StreamHub, TooManyStreams, valid_id
from rag.answering.jobs import (
    FINISHED,
    CourseGone,
    Job,
    JobStatus,
    ServedBy,
    SessionNotFound,
    create_job,
    final_event,
    get_job,
    request_cancel,
)
from rag.answering.queue import ANSWER_QUESTION, QUEUE_NAME, cancel_key, wake_workers
from rag.learners.feedback import Feedback, Rating, give_feedback
from rag.platform import metrics, tracing
from rag.platform.errors import (
    AssistantError,
    IdempotencyKeyReused,
    InvalidInput,
    NotFound,
    RateLimited,
    TooManyInflight,
)
from rag.platform.logs import REQUEST_ID
from rag.platform.redis import translated
from rag.platform.tokens import count_tokens
from rag.protection.auth import Authenticator, Identity

log = logging.getLogger("api.questions")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


class QuestionCreate(msgspec.Struct, forbid_unknown_fields=True):
    question: str
    session_id: uuid.UUID | None = None


class QuestionAccepted(msgspec.Struct):
    job_id: uuid.UUID
    session_id: uuid.UUID
    status: JobStatus
    status_url: str
    events_url: str


class JobView(msgspec.Struct):
    job_id: uuid.UUID
    session_id: uuid.UUID
    status: JobStatus
    question: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    answer: str | None
    citations: Any
    usage: Any
    cached: bool
    #: How the answer was served: generated, semantic_cache or followed (null until it is).
    served_by: ServedBy | None
    #: From what: {"cached_question_id", "similarity", "verified"} or {"job_id"} (null when
    #: generated).
    served_from: Any
    error: Any
    #: The question as retrieval and the cache read it, when it was a follow-up
    #: rewritten to stand alone (null otherwise, and until the job runs).
    standalone_question: str | None
    #: Carries a short-lived token for this job, so that EventSource can open it.
    events_url: str

    @classmethod
    def of(cls, job: Job, events_url: str) -> JobView:
        """The view of a job: every field but ``job_id`` and ``events_url`` is the
        job's field of the same name (a test checks that each one exists there)."""
        shared = {name: getattr(job, name) for name in _JOB_FIELDS}
        return cls(job_id=job.id, events_url=events_url, **shared)


#: JobView's fields taken from Job by name.
_JOB_FIELDS = tuple(
    f.name for f in msgspec.structs.fields(JobView) if f.name not in ("job_id", "events_url")
)


def events_url(state: State, job_id: uuid.UUID, user_id: str) -> str:
    """The job's SSE URL with a stream token (``EventSource`` cannot send headers)."""
    auth: Authenticator = state.auth
    return f"/v1/jobs/{job_id}/events?token={auth.stream_token(user_id, job_id)}"


def clean_question(text: str, max_chars: int, max_tokens: int | None = None) -> str:
    """NFC, trimmed, something visible in it (not only whitespace or format
    characters), no control characters or lone surrogates, at most ``max_chars``
    characters and ``max_tokens`` tokens; 422 with the reason otherwise."""
    question = unicodedata.normalize("NFC", text).strip()
    if not question:
        raise InvalidInput("the question is empty")
    # Format characters (zero-width spaces and joiners, bidi marks and controls, the
    # BOM) render as nothing: a question made of them alone is empty too.
    if all(c.isspace() or unicodedata.category(c) == "Cf" for c in question):
        raise InvalidInput("the question has no visible characters")
    if len(question) > max_chars:
        raise InvalidInput(
            f"the question is {len(question)} characters long; the limit is {max_chars}",
            details={"limit": max_chars, "unit": "characters"},
        )
    # Lone surrogates (category Cs) cannot be encoded as UTF-8 for PostgreSQL.
    bad = next(
        (c for c in question if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t"),
        None,
    )
    if bad is not None:
        kind = "control" if unicodedata.category(bad) == "Cc" else "surrogate"
        raise InvalidInput(f"the question contains the {kind} character U+{ord(bad):04X}")
    if max_tokens is not None and (tokens := count_tokens(question)) > max_tokens:
        raise InvalidInput(
            f"the question is {tokens} tokens long; the limit is {max_tokens}",
            details={"limit": max_tokens, "unit": "tokens"},
        )
    return question


def _same_question(job: Job, data: QuestionCreate, question: str, course_id: int) -> bool:
    """Whether a repeated Idempotency-Key comes with the request that first used it."""
    return (
        job.question == question
        and job.course_id == course_id
        and data.session_id in (None, job.session_id)
    )


def _idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise InvalidInput("Idempotency-Key must be 1 to 200 visible ASCII characters")
    return key


@post(
    "/v1/courses/{course_key:str}/questions",
    status_code=202,
    dependencies={"identity": Provide(current_identity)},
    before_request=require_json,
    responses=error_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 503),
    summary="Ask a question about a course; answers 202 with where to follow the answer",
)
async def ask(
    course_key: FromPath[str],
    data: JSONBody[QuestionCreate],
    identity: NamedDependency[Identity],
    state: State,
    request: Request[Any, Any, Any],
) -> QuestionAccepted:
    settings = state.settings
    question = clean_question(
        data.question, settings.question_max_chars, settings.question_max_tokens
    )
    key = _idempotency_key(request)
    # Charged only now: a request refused for its content (4xx) costs no question.
    course = await admit_question(state, identity, course_key, request)
    user = identity.user_id
    await require_enrollment(state, identity, course)
    try:
        job = await create_job(
            state.res.db,
            user_id=user,
            course_id=course.id,
            question=question,
            session_id=data.session_id,
            idempotency_key=key,
            max_inflight=settings.max_inflight_per_user,
        )
    except SessionNotFound:
        raise NotFound(f"no session {data.session_id} for this course") from None
    except TooManyInflight:
        metrics.RATE_LIMITED.labels("inflight").inc()
        raise
    except CourseGone:
        state.catalog.drop(course_key)
        raise NotFound(f"no course {course_key!r}") from None
    if key is not None and not job.created and not _same_question(job, data, question, course.id):
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used for a different question: "
            "send a new key with each new question"
        )
    if job.status == "queued":
        # arq ignores a job id it already holds, so a repeated key (or a retry
        # after a failed enqueue) enqueues at most once.
        async with translated():
            with tracing.tracer().start_as_current_span(
                "enqueue", attributes={"job.id": str(job.id), "course.key": course_key}
            ):
                enqueued = await state.arq.enqueue_job(
                    ANSWER_QUESTION,
                    str(job.id),
                    REQUEST_ID.get(),
                    tracing.carrier(),
                    _job_id=str(job.id),
                    _queue_name=QUEUE_NAME,
                )
                if enqueued is not None:
                    await wake_workers(state.arq)
    return QuestionAccepted(
        job.id, job.session_id, job.status, f"/v1/jobs/{job.id}", events_url(state, job.id, user)
    )


@get(
    "/v1/jobs/{job_id:uuid}",
    dependencies=reading(current_user),
    responses=error_responses(400, 401, 404, 422, 429, 503),
    summary="A job's state, answer, citations, usage and error",
)
async def read_job(
    job_id: FromPath[uuid.UUID], user: NamedDependency[str], state: State
) -> JobView:
    job = await get_job(state.res.db, job_id, user)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return JobView.of(job, events_url(state, job.id, user))


@delete(
    "/v1/jobs/{job_id:uuid}",
    status_code=200,
    dependencies={"user": Provide(current_user)},
    responses=error_responses(400, 401, 404, 422, 429, 503),
    summary="Cancel a job: a queued one never runs, a running one stops generating",
)
async def cancel_job(
    job_id: FromPath[uuid.UUID], user: NamedDependency[str], state: State
) -> JobView:
    job = await request_cancel(state.res.db, job_id, user)
    if job is None:
        raise NotFound(f"no job {job_id}")
    async with translated():
        if job.status == "running":
            # The worker polls this flag between token batches.
            await state.res.redis.set(cancel_key(job_id), b"1", ex=3600)
        elif job.status == "cancelled":
            # Followers of the stream end on this event; a queued job never starts.
            await state.events.publish(
                str(job_id),
                "error",
                {"code": "cancelled", "message": "the question was cancelled", "retryable": False},
            )
    return JobView.of(job, events_url(state, job.id, user))


#: Seconds a follower waits with no event before giving up (the job is stuck or
#: its stream expired); the browser reconnects and gets the final state then.
FOLLOW_IDLE_SECONDS = 120
HEARTBEAT_SECONDS = 5.0
#: What a client refused a stream is told to wait before trying again.
STREAM_RETRY_AFTER = 5.0


_ON_DROP = "course_assistant.on_stream_drop"


class _SlowReader(Exception):
    """A write to an event stream waited longer than ``SSE_WRITE_TIMEOUT``."""


def _caused_by_slow_reader(exc: BaseException | None) -> bool:
    # Litestar reports it wrapped: a task group's ExceptionGroup inside
    # "Exception caught after response started".
    while exc is not None:
        if isinstance(exc, _SlowReader):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return any(_caused_by_slow_reader(e) for e in exc.exceptions)
        exc = exc.__cause__ or exc.__context__
    return False


def drop_slow_readers(app: ASGIApp) -> ASGIApp:
    """Route middleware: a stream whose client stops reading is dropped after
    ``SSE_WRITE_TIMEOUT`` seconds of one blocked write, instead of holding its task
    (and its place in the stream caps) for as long as the TCP connection lives."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        timeout = Litestar.from_scope(scope).state.settings.sse_write_timeout
        # What to release when the stream is dropped: the handler adds its subscription
        # (the generator's own clean-up waits for the garbage collector then).
        on_drop: list[Callable[[], None]] = []
        cast(dict[str, Any], scope)[_ON_DROP] = on_drop

        async def timed_send(message: Message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                raise _SlowReader from None

        try:
            await app(scope, receive, timed_send)
        except Exception as exc:
            if not _caused_by_slow_reader(exc):
                raise
            for release in on_drop:
                release()
            log.warning("dropped an event stream: its client read nothing for %gs", timeout)

    return middleware


def _events_user(request: Request[Any, Any, Any], state: State, job_id: FromPath[uuid.UUID]) -> str:
    """:func:`stream_user` as a dependency (its stream token is for this job)."""
    return stream_user(request, state, job_id)


@get(
    "/v1/jobs/{job_id:uuid}/events",
    dependencies=reading(_events_user),
    middleware=[drop_slow_readers],
    responses=error_responses(400, 401, 404, 422, 429, 503),
    summary="Server-Sent Events of a job: status, token, citations, done, error",
)
async def job_events(
    job_id: FromPath[uuid.UUID],
    user: NamedDependency[str],
    state: State,
    request: Request[Any, Any, Any],
    token: FromQuery[str | None] = None,
    last_event_id: FromQuery[str | None] = None,
) -> ServerSentEvent:
    """Replays the job's Redis Stream after ``Last-Event-ID`` (header, or the
    ``last_event_id`` query parameter for clients that cannot set headers), then
    follows it to ``done`` or ``error``. Errors after the stream opened are events:
    a browser's EventSource gives up for good on an HTTP error."""
    # ``token`` (the stream token in events_url) and ``last_event_id`` are read
    # from the query string; they are parameters here so the schema lists them.
    job = await get_job(state.res.db, job_id, user)
    if job is None:
        raise NotFound(f"no job {job_id}")
    after = request.headers.get("last-event-id") or last_event_id
    if after is not None and not valid_id(after):
        raise InvalidInput("Last-Event-ID is not an event id of this stream")
    events: EventLog = state.events
    hub: StreamHub = state.streams
    key = str(job_id)
    if after is None and job.status in FINISHED and not await events.exists(key):
        # The stream expired: the final state comes from PostgreSQL.
        return _sse(_single(_final_message(job)))
    try:
        # Reserved now, so that a refusal is a 429 and not an event.
        sub = hub.subscribe(key, user, after)
    except TooManyStreams as exc:
        metrics.RATE_LIMITED.labels("event_streams").inc()
        raise RateLimited(
            exc.message, retry_after=STREAM_RETRY_AFTER, details={"limit": "event_streams"}
        ) from None

    async def stream() -> AsyncIterator[ServerSentEventMessage]:
        seen_terminal = False
        try:
            async for event in hub.follow(
                sub, heartbeat=HEARTBEAT_SECONDS, idle_timeout=FOLLOW_IDLE_SECONDS
            ):
                if event is None:
                    yield ServerSentEventMessage(comment="heartbeat")
                    continue
                seen_terminal = seen_terminal or event.terminal
                yield ServerSentEventMessage(
                    data=msgspec.json.encode(event.data).decode(), event=event.type, id=event.id
                )
        except AssistantError as exc:
            yield ServerSentEventMessage(
                data=msgspec.json.encode(exc.public_dict() | {"retryable": True}).decode(),
                event="error",
            )
            return
        if not seen_terminal:
            latest = await get_job(state.res.db, job_id, user)
            if latest is not None and latest.status in FINISHED:
                yield _final_message(latest)

    body = stream()
    # A response dropped before its body starts never runs the generator's finally.
    weakref.finalize(body, sub.close)
    cast(dict[str, Any], request.scope).get(_ON_DROP, []).append(sub.close)
    return _sse(body)


def _sse(body: AsyncIterator[ServerSentEventMessage]) -> ServerSentEvent:
    return ServerSentEvent(
        body,
        retry_duration=2000,
        headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
    )


async def _single(message: ServerSentEventMessage) -> AsyncIterator[ServerSentEventMessage]:
    yield message


def _final_message(job: Job) -> ServerSentEventMessage:
    event, data = final_event(job)
    return ServerSentEventMessage(data=msgspec.json.encode(data).decode(), event=event)


#: The methods /v1/jobs/{job_id} answers, from its handlers.
_JOB_METHODS = ", ".join(sorted({*read_job.http_methods, *cancel_job.http_methods, "OPTIONS"}))


@route(
    "/v1/jobs/{job_id:uuid}",
    http_method=[HttpMethod.OPTIONS],
    status_code=204,
    include_in_schema=False,
    sync_to_thread=False,
)
def job_options() -> Response[None]:
    """Litestar 2's own OPTIONS handler lists only the methods of the first handler
    registered on a path (litestar-org/litestar#4169, fixed in 3): this path has two."""
    return Response(None, status_code=204, headers={"Allow": _JOB_METHODS})


class FeedbackCreate(msgspec.Struct, forbid_unknown_fields=True):
    rating: Rating
    comment: str = ""


@post(
    "/v1/jobs/{job_id:uuid}/feedback",
    status_code=200,
    dependencies={"user": Provide(current_user)},
    before_request=require_json,
    responses=error_responses(400, 401, 404, 413, 415, 422, 503),
    summary="Rate an answer up or down (the job's owner; a second rating replaces the first)",
)
async def rate_answer(
    job_id: FromPath[uuid.UUID],
    data: JSONBody[FeedbackCreate],
    user: NamedDependency[str],
    state: State,
) -> Feedback:
    return await give_feedback(state.res.db, job_id, user, data.rating, data.comment)


ROUTES = [job_options, ask, read_job, job_events, cancel_job, rate_answer]
