"""The per-job event log: one capped, expiring Redis Stream per job.

Workers publish ``status``, ``token``, ``citations`` and finally ``done`` or
``error``; a job run again after a crash or a worker shutdown first publishes
``reset`` (drop the text received so far: the answer starts over). The API
replays the same stream for SSE (the SSE ``id:`` is the stream id, so
``Last-Event-ID`` resumes exactly) and for polling.

The API does not follow streams one by one: :class:`StreamHub` follows every
stream open in the process with one blocking ``XREAD`` on a connection of its
own, so open streams never hold the pool's connections. :meth:`EventLog.follow`
(one blocking read per follower, on the pool) is for the workers' single-flight
followers, whose number ``WORKER_CONCURRENCY`` bounds; keep ``block_ms`` short
there (default 5 s): each timeout hands the connection back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import msgspec
from redis.typing import EncodableT, FieldT

from rag.answering.queue import stream_key
from rag.platform.errors import RedisUnavailable
from rag.platform.redis import Redis, as_text, translated

log = logging.getLogger("rag.answering.events")

STATUS: Final = "status"
TOKEN: Final = "token"
CITATIONS: Final = "citations"
DONE: Final = "done"
ERROR: Final = "error"
RESET: Final = "reset"

EVENT_TYPES: Final = frozenset({STATUS, TOKEN, CITATIONS, DONE, ERROR, RESET})
TERMINAL_TYPES: Final = frozenset({DONE, ERROR})

# ASCII digits only: ``\d`` would also accept other scripts' digits, which Redis rejects.
_ID_RE: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
# Twenty digits can still overflow the unsigned 64-bit halves of a stream id.
_U64_MAX: Final = 2**64 - 1

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(dict[str, Any])


class Event(msgspec.Struct, frozen=True):
    """One entry of a job's stream; ``id`` is the Redis stream id."""

    id: str
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def valid_id(value: str) -> bool:
    """Whether ``value`` is a full stream id Redis would accept (``ms-seq``)."""
    if not _ID_RE.fullmatch(value):
        return False
    ms, seq = value.split("-")
    return int(ms) <= _U64_MAX and int(seq) <= _U64_MAX


def _id_key(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _event(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    # Works with either client mode; the project's client returns bytes.
    norm = {as_text(k): v for k, v in fields.items()}
    return Event(id=as_text(entry_id), type=as_text(norm["e"]), data=_decoder.decode(norm["d"]))


class EventLog:
    """Publish to and read from job event streams."""

    def __init__(self, redis: Redis, *, maxlen: int = 5000, ttl_seconds: int = 3600) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        if ttl_seconds < 1:
            raise ValueError("ttl_seconds must be at least 1")
        self._redis = redis
        self.maxlen = maxlen
        self.ttl_seconds = ttl_seconds

    async def publish(self, job_id: str, type: str, data: dict[str, Any]) -> str:
        """Append one event; returns its stream id."""
        (stream_id,) = await self.publish_many(job_id, [(type, data)])
        return stream_id

    async def publish_watching(
        self, job_id: str, type: str, data: dict[str, Any], flag: str
    ) -> bool:
        """Append one event and say whether the key ``flag`` exists, in one round trip:
        a streaming answer learns of a cancel request with each token event it sends."""
        results = await self._append(job_id, [(type, data)], also_exists=flag)
        return bool(results[-1])

    async def publish_many(
        self, job_id: str, events: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[str]:
        """Append events in order in one round trip (tokens are batched this way)."""
        if not events:
            return []
        results = await self._append(job_id, events)
        return [as_text(r) for r in results[: len(events)]]

    async def _append(
        self,
        job_id: str,
        events: Sequence[tuple[str, dict[str, Any]]],
        *,
        also_exists: str | None = None,
    ) -> list[Any]:
        # Encode before touching Redis so a bad payload publishes nothing.
        payloads: list[dict[FieldT, EncodableT]] = []
        for type_, data in events:
            if type_ not in EVENT_TYPES:
                raise ValueError(f"unknown event type {type_!r}")
            payloads.append({"e": type_, "d": _encoder.encode(data)})
        key = stream_key(job_id)
        async with translated(), self._redis.pipeline(transaction=False) as pipe:
            for payload in payloads:
                # Approximate trimming drops whole radix-tree nodes: O(1) amortised.
                pipe.xadd(key, payload, maxlen=self.maxlen, approximate=True)
            # Re-arm on every publish: the log lives ttl_seconds past its last event.
            pipe.expire(key, self.ttl_seconds)
            if also_exists is not None:
                pipe.exists(also_exists)
            results: list[Any] = await pipe.execute()
        return results

    async def read(
        self,
        job_id: str,
        *,
        after: str | None = None,
        block_ms: int | None = None,
        count: int = 500,
    ) -> list[Event]:
        """Up to ``count`` events strictly after ``after`` (None: from the start).

        With ``block_ms``, waits that long for something new and returns ``[]``
        on timeout. XREAD ids are exclusive, so passing the last id seen resumes
        with no loss and no repeat (as long as the cap has not trimmed past it).
        """
        if after is not None and not valid_id(after):
            raise ValueError(f"invalid stream id {after!r}")
        if block_ms is not None and block_ms < 1:
            # BLOCK 0 would wait forever while holding a pooled connection.
            raise ValueError("block_ms must be at least 1")
        if count < 1:
            raise ValueError("count must be at least 1")
        key = stream_key(job_id)
        async with translated():
            reply = await self._redis.xread({key: after or "0-0"}, count=count, block=block_ms)
        return [
            _event(entry_id, fields)
            for _, entries in _entries(reply)
            for entry_id, fields in entries
        ]

    async def follow(
        self,
        job_id: str,
        *,
        after: str | None = None,
        block_ms: int = 5000,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[Event | None]:
        """Events in order up to and including the terminal one, then stop.

        Yields ``None`` whenever a block of ``block_ms`` passes with nothing new
        (the SSE endpoint sends a heartbeat then). With ``idle_timeout``, stops
        without a terminal event once that many seconds pass with no event, so a
        job whose worker died (or whose stream expired) cannot pin a follower.
        """
        async for batch in self.follow_batches(
            job_id, after=after, block_ms=block_ms, idle_timeout=idle_timeout
        ):
            if batch is None:
                yield None
                continue
            for event in batch:
                yield event

    async def follow_batches(
        self,
        job_id: str,
        *,
        after: str | None = None,
        block_ms: int = 5000,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[list[Event] | None]:
        """:meth:`follow` a read at a time: each list is what one ``XREAD`` returned
        (cut after the terminal event), so a relay can pass it on in one round trip."""
        if after is not None and await self.ended_by(job_id, after):
            return
        cursor = after
        idle_since = time.monotonic()
        while True:
            wait = block_ms
            if idle_timeout is not None:
                remaining = idle_timeout - (time.monotonic() - idle_since)
                if remaining <= 0:
                    return
                wait = max(1, min(block_ms, int(remaining * 1000) + 1))
            events = await self.read(job_id, after=cursor, block_ms=wait)
            if not events:
                if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    return
                yield None
                continue
            idle_since = time.monotonic()
            for n, event in enumerate(events):
                if event.terminal:
                    yield events[: n + 1]
                    return
            yield events
            cursor = events[-1].id

    async def ended_by(self, job_id: str, after: str) -> bool:
        """Whether the stream's terminal event is at or before ``after``: resuming from
        the terminal event itself would otherwise wait for nothing until idle."""
        last = await self.last(job_id)
        return last is not None and last.terminal and _id_key(last.id) <= _id_key(after)

    async def last(self, job_id: str) -> Event | None:
        """The newest event, or None when the stream does not exist."""
        async with translated():
            entries = await self._redis.xrevrange(stream_key(job_id), count=1)
        if not entries:
            return None
        entry_id, fields = entries[0]
        return _event(entry_id, fields)

    async def exists(self, job_id: str) -> bool:
        async with translated():
            return bool(await self._redis.exists(stream_key(job_id)))


class TooManyStreams(Exception):
    """A process or user already holds as many open streams as allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Subscription:
    """One open stream of a :class:`StreamHub`: the events of one job after a cursor.

    The hub appends what its reader gets; :meth:`StreamHub.follow` takes it out.
    :meth:`close` is synchronous and idempotent, so it can also run from a
    finalizer when a response is dropped before its body ever started.
    """

    def __init__(self, hub: StreamHub, job_id: str, user: str, after: str | None) -> None:
        self.hub = hub
        self.job_id = job_id
        self.key = stream_key(job_id)
        self.user = user
        self.cursor = after or "0-0"
        self.pending: list[Event] = []
        self.failure: Exception | None = None
        self.finished = False
        self.closed = False
        self.ready = asyncio.Event()

    def deliver(self, events: list[Event], read_from: str) -> None:
        """Take the events of one read that started at ``read_from``. A subscriber that
        joined during that read, further back, skips it: it is read from its own
        cursor next time, so nothing between the two is lost."""
        cursor = _id_key(self.cursor)
        if cursor < _id_key(read_from):
            return
        fresh = [e for e in events if _id_key(e.id) > cursor]
        if not fresh or self.finished:
            return
        for n, event in enumerate(fresh):
            if event.terminal:
                fresh = fresh[: n + 1]
                self.finished = True
                break
        self.pending.extend(fresh)
        self.cursor = fresh[-1].id
        if len(self.pending) > self.hub.max_pending:
            # Not read for this long: a client that stopped reading. Its buffer would
            # grow for as long as the job runs; drop it (it can reconnect and resume).
            self.pending.clear()
            self.fail(TooManyStreams("the stream was dropped: the client is not reading"))
        self.ready.set()
        if self.finished:
            self.hub._detach(self)

    def fail(self, exc: Exception) -> None:
        self.failure = exc
        self.ready.set()
        self.hub._detach(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._release(self)


class StreamHub:
    """Follows every job stream open in this process with one blocking ``XREAD``.

    An SSE stream that followed its job with its own blocking ``XREAD`` held a
    pooled connection for as long as it was open: 200 idle streams held most of
    the API's pool, and every other route answered ``503 redis_unavailable``.
    Here one reader task per process waits on all open streams at once, over a
    connection of its own (never the pool's), and hands each subscriber its
    events in memory. A new stream wakes the reader by adding to the hub's own
    wake-up stream, which the same ``XREAD`` waits on: one short command on the
    pool per stream opened, none per event or per heartbeat.

    Streams are capped per process and per user (:class:`TooManyStreams`, a
    429 in the API), and a subscriber more than ``max_pending`` events behind
    is dropped, so a client that stops reading costs a bounded buffer.
    """

    def __init__(
        self,
        reader: Redis,
        pool: Redis,
        *,
        max_streams: int,
        max_per_user: int,
        block_ms: int = 5000,
        max_pending: int = 2000,
        count: int = 500,
    ) -> None:
        self._reader = reader
        self._pool = pool
        self._log = EventLog(pool)
        self.max_streams = max_streams
        self.max_per_user = max_per_user
        self.max_pending = max_pending
        self._block_ms = block_ms
        self._count = count
        self._open: set[Subscription] = set()
        self._per_user: dict[str, int] = {}
        self._by_key: dict[str, set[Subscription]] = {}
        self._wake_key = f"sse:wake:{uuid.uuid4().hex}"
        self._wake_cursor = "0-0"
        self._changed = asyncio.Event()
        self._reading = False
        self._task: asyncio.Task[None] | None = None

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sse-stream-hub")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in list(self._open):
            sub.fail(RedisUnavailable("the API is shutting down"))
        await self._reader.aclose()

    def subscribe(self, job_id: str, user: str, after: str | None = None) -> Subscription:
        """Reserve a stream for ``user`` (synchronously: raises :class:`TooManyStreams`
        before any response starts); its events flow once :meth:`follow` runs."""
        if len(self._open) >= self.max_streams:
            raise TooManyStreams(
                f"this server has {self.max_streams} event streams open, its limit"
            )
        if self._per_user.get(user, 0) >= self.max_per_user:
            raise TooManyStreams(
                f"you have {self.max_per_user} event streams open, the limit: close one first"
            )
        sub = Subscription(self, job_id, user, after)
        self._open.add(sub)
        self._per_user[user] = self._per_user.get(user, 0) + 1
        return sub

    async def follow(
        self, sub: Subscription, *, heartbeat: float, idle_timeout: float | None = None
    ) -> AsyncIterator[Event | None]:
        """The subscription's events up to its terminal one, ``None`` after each
        ``heartbeat`` seconds without one; stops after ``idle_timeout`` seconds of
        silence. Raises the reader's failure (:class:`RedisUnavailable`, a drop)."""
        try:
            if sub.cursor != "0-0" and await self._log.ended_by(sub.job_id, sub.cursor):
                return
            self._by_key.setdefault(sub.key, set()).add(sub)
            await self._wake()
            idle_since = time.monotonic()
            while True:
                wait = heartbeat
                if idle_timeout is not None:
                    remaining = idle_timeout - (time.monotonic() - idle_since)
                    if remaining <= 0:
                        return
                    wait = min(wait, remaining)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await sub.ready.wait()
                sub.ready.clear()
                if sub.failure is not None:
                    raise sub.failure
                if not sub.pending:
                    if idle_timeout is None or time.monotonic() - idle_since < idle_timeout:
                        yield None
                    continue
                idle_since = time.monotonic()
                events, sub.pending = sub.pending, []
                for event in events:
                    yield event
                if sub.finished:
                    return
        finally:
            sub.close()

    # -- bookkeeping (synchronous: no await between a check and its update)

    def _detach(self, sub: Subscription) -> None:
        subs = self._by_key.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_key[sub.key]

    def _release(self, sub: Subscription) -> None:
        self._detach(sub)
        if sub in self._open:
            self._open.discard(sub)
            left = self._per_user.get(sub.user, 1) - 1
            if left > 0:
                self._per_user[sub.user] = left
            else:
                self._per_user.pop(sub.user, None)

    async def _wake(self) -> None:
        """Make the reader include a new key now rather than after its current block."""
        if not self._reading:
            self._changed.set()
            return
        async with translated(), self._pool.pipeline(transaction=False) as pipe:
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.expire(self._wake_key, 3600)
            await pipe.execute()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._by_key:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams: dict[Any, Any] = {self._wake_key: self._wake_cursor}
            for key, subs in self._by_key.items():
                streams[key] = min((s.cursor for s in subs), key=_id_key)
            self._reading = True
            try:
                async with translated():
                    reply = await self._reader.xread(
                        streams, count=self._count, block=self._block_ms
                    )
            except Exception as exc:  # the reader must outlive any failure, not only outages
                if not isinstance(exc, RedisUnavailable):
                    log.exception("event streams: reading failed")
                    exc = RedisUnavailable("reading the event streams failed")
                else:
                    log.warning("event streams: %s; retrying in %.1fs", exc, backoff)
                # Every open stream ends with a retryable error: clients reconnect and resume.
                for subs in list(self._by_key.values()):
                    for sub in list(subs):
                        sub.fail(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self._reading = False
            backoff = 0.1
            for key, entries in _entries(reply):
                if key == self._wake_key:
                    self._wake_cursor = as_text(entries[-1][0])
                    continue
                events = [_event(entry_id, fields) for entry_id, fields in entries]
                for sub in list(self._by_key.get(key, ())):
                    sub.deliver(events, streams[key])


def _entries(reply: Any) -> list[tuple[str, list[Any]]]:
    """``XREAD``'s reply as (key, entries): RESP2 gives [[key, entries]], RESP3
    {key: [entries]}."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(as_text(key), value[0]) for key, value in reply.items()]
    return [(as_text(key), entries) for key, entries in reply]
