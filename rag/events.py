"""The per-job event log: one capped, expiring Redis Stream per job.

Workers publish ``status``, ``token``, ``citations`` and finally ``done`` or
``error``; a job run again after a crash or a worker shutdown first publishes
``reset`` (drop the text received so far: the answer starts over). The API
replays the same stream for SSE (the SSE ``id:`` is the stream id, so
``Last-Event-ID`` resumes exactly) and for polling.

Pool sizing: a blocking ``XREAD`` holds one pooled connection for up to
``block_ms``, so the API's ``REDIS_MAX_CONNECTIONS`` bounds how many SSE
followers can wait at once (beyond it, callers queue for a connection and then
fail with :class:`~rag.errors.RedisUnavailable`). Keep ``block_ms`` short (the
default is 5 s): each timeout hands the connection back and gives the SSE
endpoint its heartbeat.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import msgspec
from redis.typing import EncodableT, FieldT

from rag.redis import Redis, as_text, translated

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


def stream_key(job_id: str) -> str:
    return f"job:{job_id}:events"


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

    async def publish_many(
        self, job_id: str, events: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[str]:
        """Append events in order in one round trip (tokens are batched this way)."""
        if not events:
            return []
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
            results = await pipe.execute()
        return [as_text(r) for r in results[:-1]]

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
        if not reply:
            return []
        # RESP2 gives [[key, entries]], RESP3 gives {key: [entries]}.
        entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return [_event(entry_id, fields) for entry_id, fields in entries]

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
        if after is not None:
            # Resuming from the terminal event itself would otherwise block until idle.
            last = await self.last(job_id)
            if last is not None and last.terminal and _id_key(last.id) <= _id_key(after):
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
