"""The project's one error hierarchy.

Driver errors (psycopg, redis, openai, httpx) are translated into these at
the boundary that owns the driver; the API renders every one of them in the
same JSON shape ``{"error": {"code", "message", "details"}}`` and the CLI
prints ``error: <message>`` and exits non-zero.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AssistantError(Exception):
    """Base of every error the service raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    #: What clients are told instead of ``message`` when that may carry driver
    #: text (table names, hosts); None: ``message`` is safe to show.
    public_message: ClassVar[str | None] = None
    #: Seconds after which trying again may succeed (the API's ``Retry-After``);
    #: None: no advice. A class default, or per error (a rate limit knows it).
    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
        public: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}
        if retry_after is not None:
            self.retry_after = retry_after
        #: This error's own client-safe message (``message`` quotes a third party).
        self._public = public

    @property
    def public_text(self) -> str:
        """What a client is told: ``message`` unless it may carry driver or provider text."""
        if self._public is not None:
            return self._public
        return self.public_message if self.public_message is not None else self.message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` for clients: the log keeps the full message."""
        if self._public is None and self.public_message is None:
            return self.to_dict()
        return {"code": self.code, "message": self.public_text, "details": {}}


class ConfigError(AssistantError):
    """A setting is missing or malformed; start-up stops with this message."""

    code = "config_error"


class SchemaError(AssistantError):
    """The database schema is not what this code expects (migrations, dimensions)."""

    code = "schema_error"
    status = 503


class MigrationError(SchemaError):
    code = "migration_error"


class DimensionMismatch(SchemaError):
    """The database's vectors are not ``EMBEDDING_DIMENSIONS`` long: every process
    refuses to start (a reindex or a setting fixes it, a restart does not)."""

    code = "dimension_mismatch"


class NotFound(AssistantError):
    code = "not_found"
    status = 404


class Busy(AssistantError):
    """Someone else holds what this needs (another reindex, say); try again later."""

    code = "busy"
    status = 409
    retryable = True


class Forbidden(AssistantError):
    """The caller is known but may not do this (e.g. not enrolled in the course)."""

    code = "forbidden"
    status = 403


class InvalidInput(AssistantError):
    """The request is well-formed but its content is not acceptable."""

    code = "invalid_request"
    status = 422


class IdempotencyKeyReused(InvalidInput):
    """An ``Idempotency-Key`` sent again with a different request (as payment APIs do:
    the key names one request, and a retry must repeat it exactly)."""

    code = "idempotency_key_reused"


class CourseSourceError(AssistantError):
    """A course folder or JSON file cannot be imported; nothing was written."""

    code = "invalid_course_source"
    status = 422

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}", details={"file": file, "problem": problem})
        self.file = file
        self.problem = problem


class ServiceUnavailable(AssistantError):
    """A backing service (PostgreSQL, Redis) cannot be reached right now."""

    code = "service_unavailable"
    status = 503
    retryable = True
    retry_after = 1.0


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"
    public_message = "the database is unavailable; try again shortly"


class RedisUnavailable(ServiceUnavailable):
    code = "redis_unavailable"
    public_message = "the queue is unavailable; try again shortly"


class Overloaded(ServiceUnavailable):
    """Too many questions are waiting in the queue (``MAX_QUEUE_DEPTH``): shed load."""

    code = "overloaded"
    retry_after = 5.0


class RateLimited(AssistantError):
    """The caller went over a rate limit; ``retry_after`` says when one more conforms."""

    code = "rate_limited"
    status = 429
    retryable = True


class BudgetExhausted(AssistantError):
    """The caller's (or the course's) daily token budget is spent; it resets at 00:00 UTC."""

    code = "budget_exhausted"
    status = 429
    retryable = True


class TooManyInflight(AssistantError):
    """The caller already has ``MAX_INFLIGHT_PER_USER`` questions queued or running."""

    code = "too_many_inflight"
    status = 429
    retryable = True
    retry_after = 5.0


class DatabaseError(AssistantError):
    """A query failed for a reason other than availability (a bug or a constraint)."""

    code = "database_error"
    public_message = "a database query failed on our side"


class ProviderError(AssistantError):
    """The model provider failed after the retry layer gave up."""

    code = "provider_error"
    status = 502


class ProviderUnavailable(ProviderError):
    """429, 5xx, timeouts, connection errors: worth trying again later."""

    code = "provider_unavailable"
    status = 503
    retryable = True


class ModelBusy(ProviderError):
    """Every model slot (MODEL_CONCURRENCY_*) stayed taken: our own capacity bound."""

    code = "model_busy"
    status = 503
    retryable = True


class ProviderRejected(ProviderError):
    """The provider refused the request itself (400, 401, 404...): retrying cannot help."""

    code = "provider_rejected"
    status = 502
