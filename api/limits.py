"""Rate limits and admission control on the API's routes (over :mod:`rag.protection.limits`).

A route takes them as dependencies that wrap its identity dependency, so the
caller is identified once, by the same code as everywhere else:

- ``await admit_question(...)``: a question, charged by the route once its body
  passed validation (a dependency would run before the body is checked). One script call charges
  the user's and the course's question buckets (both or neither) and refuses
  when the arq queue already holds ``MAX_QUEUE_DEPTH`` jobs. The per-user cap on
  unfinished questions is checked by the statement that creates the job
  (:func:`rag.answering.jobs.create_job`), so it costs no round trip of its own.
- ``dependencies=reading(current_user)``: a read, charged to the user's read bucket.

Over a limit: ``429 rate_limited`` with ``Retry-After``; queue full: ``503
overloaded``. The ``RateLimit-Limit``, ``RateLimit-Remaining`` and
``RateLimit-Reset`` headers (IETF draft) describe the bucket closest to running
out, on every response of a limited route (:func:`rate_limit_headers` adds
them as the response starts, whatever produced it). Redis unreachable: ``503
redis_unavailable`` with ``Retry-After``, until it is back.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.types import Message, Scope

from rag.answering.queue import QUEUE_NAME
from rag.content.catalog import CourseCatalog, CourseRef
from rag.learners.usage import budget_keys, budgets_on, today
from rag.platform import metrics
from rag.platform.errors import BudgetExhausted, Overloaded, RateLimited
from rag.platform.settings import Settings
from rag.protection.auth import Identity
from rag.protection.limits import Budget, Decision, Limit, Limiter, whole_seconds

log = logging.getLogger("api.limits")

#: Where a limited request keeps its RateLimit-* headers until the response starts.
_HEADERS = "rate_limit_headers"


def question_limits(settings: Settings, user_id: str, course_id: int) -> list[Limit]:
    """The buckets a question is charged to (a rate of 0 turns one off)."""
    limits = []
    if settings.rate_questions_per_minute > 0:
        limits.append(
            Limit.per_minute(
                f"ratelimit:questions:user:{user_id}",
                settings.rate_questions_per_minute,
                settings.rate_questions_burst,
            )
        )
    if settings.rate_course_questions_per_minute > 0:
        limits.append(
            Limit.per_minute(
                f"ratelimit:questions:course:{course_id}",
                settings.rate_course_questions_per_minute,
                settings.rate_course_questions_burst,
            )
        )
    return limits


def question_budgets(settings: Settings, user_id: str, course_id: int) -> list[Budget]:
    """Today's token budgets a question must be under (a budget of 0 is off)."""
    if not budgets_on(settings):
        return []
    user_key, course_key = budget_keys(user_id, course_id, today())
    budgets = []
    if settings.budget_user_daily_tokens > 0:
        budgets.append(Budget(user_key, settings.budget_user_daily_tokens, "user"))
    if settings.budget_course_daily_tokens > 0:
        budgets.append(Budget(course_key, settings.budget_course_daily_tokens, "course"))
    return budgets


def read_limits(settings: Settings, user_id: str) -> list[Limit]:
    if settings.rate_reads_per_minute <= 0:
        return []
    return [
        Limit.per_minute(
            f"ratelimit:reads:user:{user_id}",
            settings.rate_reads_per_minute,
            settings.rate_reads_burst,
        )
    ]


def reading(identify: Callable[..., Any]) -> dict[str, Provide]:
    """Dependencies for a read route: ``user`` (what ``identify`` returns),
    provided only once the user's read limit admitted it."""
    return {"caller": _provide(identify), "user": Provide(_admit_read)}


def _provide(dependency: Callable[..., Any]) -> Provide:
    if inspect.iscoroutinefunction(dependency):
        return Provide(dependency)
    return Provide(dependency, sync_to_thread=False)


async def admit_question(
    state: State, caller: Identity, course_key: str, request: Request[Any, Any, Any]
) -> CourseRef:
    """Charge a question to its limits (or raise), called by the route once the
    question passed validation: a request refused for its content costs nothing.
    Returns the course (a key of no course is a 404 before it names a bucket)."""
    settings: Settings = state.settings
    # A key of no course is a 404 before it can name a bucket (cached: no round trip).
    catalog: CourseCatalog = state.catalog
    course = await catalog.resolve(course_key)
    limiter: Limiter = state.limiter
    decision = await limiter.check(
        question_limits(settings, caller.user_id, course.id),
        queue=QUEUE_NAME,
        max_depth=settings.max_queue_depth,
        budgets=question_budgets(settings, caller.user_id, course.id),
    )
    if decision.spent is not None:
        spent = decision.spent
        metrics.RATE_LIMITED.labels(f"budget_{spent.budget.scope}").inc()
        whose = "your" if spent.budget.scope == "user" else "this course's"
        raise BudgetExhausted(
            f"{whose} daily budget of {spent.budget.limit} model tokens is used up; "
            f"it resets at 00:00 UTC, in {whole_seconds(spent.resets_in)} s",
            details={
                "scope": spent.budget.scope,
                "limit": spent.budget.limit,
                "used": spent.used,
                "resets_in": spent.resets_in,
            },
            retry_after=spent.resets_in,
        )
    if decision.overloaded:
        log.warning(
            "queue holds %s jobs (MAX_QUEUE_DEPTH=%d): question refused",
            decision.queue_depth,
            settings.max_queue_depth,
        )
        metrics.RATE_LIMITED.labels("queue_depth").inc()
        raise Overloaded(
            "too many questions are waiting to be answered; try again shortly",
            details={"limit": settings.max_queue_depth},
        )
    _enforce(decision, request)
    return course


async def _admit_read(
    caller: NamedDependency[str | Identity], state: State, request: Request[Any, Any, Any]
) -> str | Identity:
    """The caller (a user id, or an :class:`Identity` for routes that need the roles),
    once its read bucket admitted the request."""
    limiter: Limiter = state.limiter
    user = caller.user_id if isinstance(caller, Identity) else caller
    _enforce(await limiter.check(read_limits(state.settings, user)), request)
    return caller


def _enforce(decision: Decision, request: Request[Any, Any, Any]) -> None:
    quota = decision.binding()
    if quota is None:
        return
    request.state[_HEADERS] = [
        (b"ratelimit-limit", str(quota.limit.burst).encode()),
        (b"ratelimit-remaining", str(quota.remaining).encode()),
        (b"ratelimit-reset", str(whole_seconds(quota.reset)).encode()),
    ]
    if not decision.admitted:
        # "ratelimit:questions:user:ann" -> "questions_user": the limit, not the caller.
        metrics.RATE_LIMITED.labels("_".join(quota.limit.key.split(":")[1:3])).inc()
        per_minute = round(quota.limit.per_second * 60)
        raise RateLimited(
            f"too many requests: {quota.limit.burst} at once and {per_minute} a minute "
            f"are allowed; try again in {whole_seconds(quota.retry_after)} s",
            details={"limit": quota.limit.burst, "per_minute": per_minute},
            retry_after=quota.retry_after,
        )


async def rate_limit_headers(message: Message, scope: Scope) -> None:
    """A ``before_send`` hook: RateLimit-* on the response of a limited request,
    whether the handler or the exception handler made it."""
    if message["type"] != "http.response.start":
        return
    headers = scope.get("state", {}).get(_HEADERS)
    if headers:
        message["headers"] = [*message.get("headers", ()), *headers]
