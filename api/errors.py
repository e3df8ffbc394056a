"""One exception handler renders every error as ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
import math
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from rag.platform.errors import AssistantError

log = logging.getLogger("api.errors")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "service_unavailable",
}


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` takes whole seconds: round up, so a client that obeys is not early."""
    return str(max(1, math.ceil(seconds)))


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    details: dict[str, Any]


class ErrorBody(msgspec.Struct):
    """Every error response, whatever its status."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "The request is malformed (JSON, types, unknown fields)",
    401: "No valid identity (see WWW-Authenticate)",
    403: "Not allowed (e.g. not enrolled in the course)",
    404: "No such resource for this user",
    408: "The body did not arrive within REQUEST_BODY_TIMEOUT",
    413: "The body is larger than REQUEST_MAX_BYTES",
    415: "The body is not application/json",
    422: "The request is well-formed but its values are not acceptable",
    429: "Over a rate limit or the in-flight cap (see Retry-After)",
    503: "A backing service is unavailable or the queue is full (see Retry-After)",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for a route's error statuses, all in the one error shape."""
    return {
        status: ResponseSpec(
            data_container=ErrorBody, description=_DESCRIPTIONS[status], generate_examples=False
        )
        for status in statuses
    }


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    headers: dict[str, str] = {}
    if isinstance(exc, AssistantError):
        status, body = exc.status, {"error": exc.public_dict()}
        if exc.retry_after is not None:
            headers["Retry-After"] = retry_after_header(exc.retry_after)
        elif exc.retryable:
            headers["Retry-After"] = "1"
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc.message)
    elif isinstance(exc, ValidationException):
        status = exc.status_code
        body = error_body(
            "invalid_request",
            "the request is not valid",
            {"problems": exc.extra} if exc.extra else {},
        )
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        body = error_body(_HTTP_CODES.get(status, "http_error"), exc.detail)
        headers.update(exc.headers or {})
    else:
        # Never a stack trace to the client; the log has it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        status = HTTP_500_INTERNAL_SERVER_ERROR
        body = error_body("internal_error", "something went wrong on our side")
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    if status == 503:
        # Every "unavailable" is temporary by definition: say when to come back.
        headers.setdefault("Retry-After", "1")
    return Response(body, status_code=status, headers=headers)
