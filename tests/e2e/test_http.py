"""HTTP edges against the real API process (uvicorn): what a misbehaving client gets."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.fixtures.processes import DEMO_COURSE_KEY

pytestmark = pytest.mark.timeout(120)


async def test_a_body_shorter_than_its_content_length_times_out_with_408(start: Any) -> None:
    """Before, the API waited for the missing bytes for as long as the client kept the
    connection open."""
    service = start(workers=0, REQUEST_BODY_TIMEOUT="1")
    url = urlsplit(service.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    body = b'{"question": '  # of the 100 bytes declared
    writer.write(
        (
            f"POST /v1/courses/{DEMO_COURSE_KEY}/questions HTTP/1.1\r\n"
            f"Host: {url.netloc}\r\nX-User-Id: slow\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    began = time.monotonic()
    async with asyncio.timeout(10):
        response = await reader.read()  # to the end: the server closes the connection
    took = time.monotonic() - began
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), response[:200]
    assert b'"code":"request_timeout"' in payload
    assert b"did not arrive within 1 s" in payload
    assert 0.9 < took < 5, took
