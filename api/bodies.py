"""Request bodies: JSON only, UTF-8 only, bounded in size, and every failure a 4xx.

Litestar reads a body whatever its ``Content-Type`` and, when msgspec fails on
something other than malformed JSON (bytes that are not UTF-8, nesting deeper
than its recursion limit), lets the error through as a 500. Here:

* :func:`require_json` (a ``before_request`` hook) answers ``415`` unless the
  body is declared ``application/json`` (charset, if given, UTF-8), before
  anything else about the request is looked at;
* :class:`ApiRequest` (the app's request class) checks UTF-8 itself and turns
  the decoder's failures into Litestar's ``SerializationException``, which
  Litestar answers as ``400``, with a message in our words,
  names the size limit in the ``413`` for a body over ``REQUEST_MAX_BYTES``
  (the app's ``request_max_body_size``), and answers ``408`` for a body that
  does not arrive within ``REQUEST_BODY_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request
from litestar.exceptions import ClientException, SerializationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.status_codes import HTTP_408_REQUEST_TIMEOUT, HTTP_415_UNSUPPORTED_MEDIA_TYPE

JSON_MEDIA_TYPE = "application/json"
_UTF8 = {"utf-8", "utf8"}


class ApiRequest(Request[Any, Any, Any]):
    """Litestar's request, with body failures that are the client's answered as such."""

    async def body(self) -> bytes:
        # A client that declares more than it sends would hold the connection (and
        # this task) for as long as it likes: uvicorn has no body timeout of its own.
        timeout: float = self.app.state.settings.request_body_timeout
        try:
            async with asyncio.timeout(timeout):
                return await super().body()
        except TimeoutError:
            raise ClientException(
                f"the request body did not arrive within {timeout:g} s",
                status_code=HTTP_408_REQUEST_TIMEOUT,
                headers={"Connection": "close"},
            ) from None
        except RequestEntityTooLarge:
            limit = self.route_handler.resolve_request_max_body_size()
            raise RequestEntityTooLarge(
                f"the request body is larger than the limit of {limit} bytes"
            ) from None

    async def json(self) -> Any:
        # UTF-8 is checked here, not left to the decoder: msgspec's reason for it (and
        # whether it raises at all) has changed between releases, and this message is ours.
        body = await self.body()
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise SerializationException("the body is not valid JSON: it is not UTF-8") from None
        try:
            return await super().json()
        except SerializationException as exc:  # msgspec's reason, after our own words
            reason = str(exc).removeprefix("JSON is malformed: ")
        except RecursionError:
            reason = "it is nested too deeply"
        raise SerializationException(f"the body is not valid JSON: {reason}")


async def require_json(request: Request[Any, Any, Any]) -> None:
    """``415`` unless the request declares a JSON body (a ``before_request`` hook)."""
    media_type, options = request.content_type
    charset = options.get("charset")
    if media_type.lower() != JSON_MEDIA_TYPE or (
        charset is not None and charset.strip().lower() not in _UTF8
    ):
        raise ClientException(
            "send the body as JSON with Content-Type: application/json (UTF-8)",
            status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        )
