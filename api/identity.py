"""Who is asking (Litestar dependencies over :mod:`rag.protection.auth`).

``Authorization: Bearer <JWT>`` is the identity. A development setting
(``DEV_IDENTITY_HEADER``) may also trust an ``X-User-Id`` header; it is off by
default, and a bearer token, when sent, always wins. Anything else answers 401
with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Request
from litestar.datastructures import State

from rag.content.catalog import CourseRef
from rag.platform.errors import Forbidden, NotFound
from rag.protection.auth import USER_ID, Authenticator, Identity, Unauthorized


def _identity(request: Request[Any, Any, Any], state: State) -> Identity:
    auth: Authenticator = state.auth
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send Authorization: Bearer <token>")
        return auth.verify(token.strip())
    if state.settings.dev_identity_header:
        user = request.headers.get("x-user-id", "")
        if not USER_ID.match(user):
            raise Unauthorized(
                "send a bearer token, or X-User-Id: 1 to 128 letters, digits or _.@:- "
                "(development identity)"
            )
        return Identity(user)
    raise Unauthorized("authentication is required: send Authorization: Bearer <token>")


async def current_identity(request: Request[Any, Any, Any], state: State) -> Identity:
    """The caller (a Litestar dependency)."""
    return _identity(request, state)


async def current_user(request: Request[Any, Any, Any], state: State) -> str:
    """The caller's user id (a Litestar dependency)."""
    return _identity(request, state).user_id


async def require_enrollment(state: State, identity: Identity, course: CourseRef) -> None:
    """The caller may use ``course``: an administrator, or enrolled in it (under
    ``DEV_AUTO_ENROLL``, enrolled now); else 403."""
    if identity.admin or await state.enrollments.enrolled(identity.user_id, course.id):
        return
    if not state.settings.dev_auto_enroll:
        raise Forbidden(f"you are not enrolled in the course {course.course_key!r}")
    await state.enrollments.enroll(identity.user_id, course.id)


def stream_user(request: Request[Any, Any, Any], state: State, job_id: uuid.UUID) -> str:
    """The user reading a job's events: from the ``token`` query parameter that
    ``events_url`` carries (``EventSource`` cannot send headers), else as usual.

    A token is bound to its user as well as its job: a request that also carries an
    identity (a bearer token, the development header) must be that user, or it is a
    404 like any other owner mismatch. A link shared or leaked to another signed-in
    user does not open the stream for them."""
    token = request.query_params.get("token")
    if token is None:
        return _identity(request, state).user_id
    auth: Authenticator = state.auth
    user = auth.verify_stream_token(token, job_id)
    if _carries_identity(request, state) and _identity(request, state).user_id != user:
        raise NotFound(f"no job {job_id}")
    return user


def _carries_identity(request: Request[Any, Any, Any], state: State) -> bool:
    return "authorization" in request.headers or (
        state.settings.dev_identity_header and "x-user-id" in request.headers
    )
