"""Who is asking. Until real authentication arrives, a development setting may
trust an ``X-User-Id`` header; with it off, every identified route answers 401."""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.datastructures import State

from rag.errors import AssistantError

_USER_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


class Unauthorized(AssistantError):
    code = "unauthorized"
    status = 401


async def current_user(request: Request[Any, Any, Any], state: State) -> str:
    """The caller's user id (a Litestar dependency)."""
    if not state.settings.dev_identity_header:
        raise Unauthorized("authentication is required")
    user = request.headers.get("x-user-id", "")
    if not _USER_ID.match(user):
        raise Unauthorized(
            "send X-User-Id: 1 to 128 letters, digits or _.@:- (development identity)"
        )
    return user
