"""A lean HTTP/1.1 load generator for the service benchmarks (``bench/service.py``).

Why not httpx for the load itself: on this 2-core machine httpx's
``AsyncClient`` spends about 1 to 2.5 ms of CPU per request, more than the
hello-world server it would be measuring (about 0.35 ms), so an httpx load
generator measures itself. This client writes a request with one ``write`` on a
keep-alive connection and reads the response with ``readuntil``/``readexactly``
(``Content-Length`` or chunked bodies, Server-Sent Events included): about
0.1 ms of CPU per request. It knows only what these benchmarks send and the
servers answer; it is not a general HTTP client.

Open-loop runs schedule request *i* at ``start + i / rate`` whatever happened to
earlier requests, and measure latency from that scheduled instant, so a server
that stalls is charged for the requests queued behind the stall (no coordinated
omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np

_json = msgspec.json.Decoder(dict[str, Any])


class HTTPError(Exception):
    """A response this client cannot use (a status, a malformed frame, a closed socket)."""


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> dict[str, Any]:
        return _json.decode(self.body)


@dataclass
class SSEEvent:
    event: str
    data: dict[str, Any]
    #: ``time.perf_counter()`` when the event's frame was parsed.
    at: float


@dataclass
class SSEResult:
    events: list[SSEEvent]
    status: int

    @property
    def terminal(self) -> SSEEvent | None:
        for event in reversed(self.events):
            if event.event in ("done", "error"):
                return event
        return None


class Connection:
    """One keep-alive HTTP/1.1 connection to ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20
            )
        return self._reader, self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def _request_bytes(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes | None
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body is not None:
            lines += ["content-type: application/json", f"content-length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")

    async def _head(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HTTPError(f"bad status line {status_line!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def _chunks(
        self, reader: asyncio.StreamReader, headers: dict[str, str]
    ) -> AsyncIterator[bytes]:
        if "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
            return
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise HTTPError("response with neither content-length nor chunked encoding")
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> Response:
        reader, writer = await self._open()
        try:
            writer.write(self._request_bytes(method, path, headers, body))
            status, response_headers = await self._head(reader)
            parts = [chunk async for chunk in self._chunks(reader, response_headers)]
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise HTTPError(f"{method} {path}: {exc!r}") from exc
        if response_headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, b"".join(parts))

    async def events(
        self,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        on_event: Callable[[SSEEvent], None] | None = None,
    ) -> SSEResult:
        """``GET`` a Server-Sent Events stream and read it to its end (the API ends a
        job's stream right after ``done`` or ``error``); the connection stays usable."""
        reader, writer = await self._open()
        events: list[SSEEvent] = []
        try:
            writer.write(
                self._request_bytes("GET", path, [*headers, ("accept", "text/event-stream")], None)
            )
            status, response_headers = await self._head(reader)
            buffer = b""
            async for chunk in self._chunks(reader, response_headers):
                buffer += chunk.replace(b"\r\n", b"\n")
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    event = _sse_event(block)
                    if event is not None:
                        events.append(event)
                        if on_event is not None:
                            on_event(event)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise HTTPError(f"GET {path}: {exc!r}") from exc
        return SSEResult(events, status)


def _sse_event(block: bytes) -> SSEEvent | None:
    name, data = "message", b""
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()
    if not data:
        return None  # a comment (heartbeat) or a retry hint
    return SSEEvent(name, _json.decode(data), time.perf_counter())


class Pool:
    """Keep-alive connections to one server, opened on demand, reused in LIFO order."""

    #: uvicorn closes a keep-alive connection after 5 idle seconds; a request
    #: written into one that is closing would fail, so older ones are not reused.
    MAX_IDLE_SECONDS = 2.0

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{base_url!r} needs a host and a port")
        self.host, self.port = parts.hostname, parts.port
        self._idle: list[tuple[float, Connection]] = []
        self.opened = 0

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        conn: Connection | None = None
        while self._idle and conn is None:
            since, candidate = self._idle.pop()
            if time.monotonic() - since < self.MAX_IDLE_SECONDS:
                conn = candidate
            else:
                candidate.close()
        if conn is None:
            conn = Connection(self.host, self.port)
            self.opened += 1
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self._idle.append((time.monotonic(), conn))

    def close(self) -> None:
        for _, conn in self._idle:
            conn.close()
        self._idle.clear()


# --- load shapes


@dataclass
class LoadResult:
    """Latencies (ms) of the requests that succeeded, and what went wrong with the rest."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: Client process CPU seconds (user + system) spent during the run.
    client_cpu_seconds: float = 0.0
    #: Open loop only: the worst delay between a request's scheduled and actual send.
    max_send_lag_ms: float = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    @property
    def count(self) -> int:
        return len(self.latencies_ms)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.count / self.seconds, 1) if self.seconds else 0.0,
            **percentiles(self.latencies_ms),
            "client_cpu_percent": round(100 * self.client_cpu_seconds / self.seconds, 1)
            if self.seconds
            else 0.0,
            "max_send_lag_ms": round(self.max_send_lag_ms, 2),
        }


def percentiles(values: Sequence[float], prefix: str = "") -> dict[str, float | None]:
    """p50, p90, p99 and max, rounded to 0.01 (None for no values)."""
    if not values:
        return {f"{prefix}p50_ms": None, f"{prefix}p90_ms": None, f"{prefix}p99_ms": None}
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])
    return {
        f"{prefix}p50_ms": round(float(p50), 2),
        f"{prefix}p90_ms": round(float(p90), 2),
        f"{prefix}p99_ms": round(float(p99), 2),
        f"{prefix}max_ms": round(float(max(values)), 2),
    }


#: One request of a load: given the connection and the request's number, send it
#: and raise (any exception) unless its response is what was expected.
Call = Callable[[Connection, int], Awaitable[None]]


async def closed_loop(pool: Pool, call: Call, *, concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` clients, each sending its next request as soon as the last answered."""
    result = LoadResult()
    counter = iter(range(1 << 62))
    started = time.perf_counter()
    cpu0 = time.process_time()
    deadline = started + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            t0 = time.perf_counter()
            try:
                async with pool.connection() as conn:
                    await call(conn, i)
            except Exception as exc:  # counted, not fatal: the figure says how many failed
                result.error(type(exc).__name__ + ": " + str(exc)[:120])
                continue
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    result.client_cpu_seconds = time.process_time() - cpu0
    return result


async def open_loop(pool: Pool, call: Call, *, rate: float, seconds: float) -> LoadResult:
    """Requests sent at a fixed ``rate`` for ``seconds``, whatever the server does."""
    result = LoadResult()
    total = round(rate * seconds)
    started = time.perf_counter()
    cpu0 = time.process_time()
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, due: float) -> None:
        result.max_send_lag_ms = max(result.max_send_lag_ms, (time.perf_counter() - due) * 1000)
        try:
            async with pool.connection() as conn:
                await call(conn, i)
        except Exception as exc:  # counted, not fatal
            result.error(type(exc).__name__ + ": " + str(exc)[:120])
            return
        # Measured from the scheduled instant, not the actual send.
        result.latencies_ms.append((time.perf_counter() - due) * 1000)

    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - started
    result.client_cpu_seconds = time.process_time() - cpu0
    return result
