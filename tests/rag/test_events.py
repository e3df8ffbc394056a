"""The per-job event log on a real Redis: order, exact resume, follow, caps, expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rag.answering.events import (
    DONE,
    TOKEN,
    Event,
    EventLog,
    StreamHub,
    Subscription,
    TooManyStreams,
    valid_id,
)
from rag.answering.queue import stream_key
from rag.platform.errors import RedisUnavailable
from rag.platform.redis import Redis, create_redis
from tests.fixtures.services import make_settings


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = create_redis(make_settings(), redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def log(redis: Redis) -> EventLog:
    return EventLog(redis)


async def collect(stream: AsyncIterator[Event | None], limit: int = 1000) -> list[Event | None]:
    """Everything ``follow`` yields (bounded, so a bug cannot hang the test)."""
    items: list[Event | None] = []
    async for item in stream:
        items.append(item)
        assert len(items) <= limit
    return items


async def test_publish_and_read_in_order_with_payloads(log: EventLog) -> None:
    sent: list[tuple[str, dict[str, Any]]] = [
        ("status", {"status": "queued"}),
        ("status", {"status": "running"}),
        ("token", {"text": "Héllo 🍞"}),
        ("citations", {"citations": [{"topic_id": 3, "title": "Yeast", "score": 0.5}]}),
        ("done", {"answer": "Hello", "usage": {"prompt": 10, "completion": 2}, "cached": False}),
    ]
    ids = [await log.publish("j1", *sent[0])]
    ids += await log.publish_many("j1", sent[1:])

    events = await log.read("j1")
    assert [(e.type, e.data) for e in events] == sent
    assert [e.id for e in events] == ids
    assert all(valid_id(i) for i in ids)
    assert await log.exists("j1")
    assert await log.last("j1") == events[-1]
    assert events[-1].terminal and not events[0].terminal


async def test_resume_in_pages_returns_exactly_the_rest(log: EventLog) -> None:
    sent = [("token", {"text": f"t{i} "}) for i in range(200)]
    for start in range(0, 200, 50):  # several batches, several ids per millisecond
        await log.publish_many("j", sent[start : start + 50])

    pages: list[Event] = []
    after: str | None = None
    while page := await log.read("j", after=after, count=7):
        assert len(page) <= 7
        pages += page
        after = page[-1].id
    assert [(e.type, e.data) for e in pages] == sent
    assert len({e.id for e in pages}) == 200

    everything = await log.read("j")
    middle = everything[99].id
    assert await log.read("j", after=middle) == everything[100:]
    assert await log.read("j", after=everything[-1].id) == []


async def test_follow_stops_after_done(log: EventLog) -> None:
    await log.publish_many(
        "j", [("status", {"status": "running"}), ("token", {"text": "a"}), ("done", {})]
    )
    await log.publish("j", "token", {"text": "after the end"})  # must not be yielded

    items = await collect(log.follow("j", block_ms=50))
    assert [e.type for e in items if e is not None] == ["status", "token", "done"]
    assert items[-1] is not None and items[-1].type == "done"


async def test_follow_batches_are_what_each_read_returned_cut_at_the_end(
    log: EventLog,
) -> None:
    await log.publish_many("j", [("status", {"status": "running"}), ("token", {"text": "a"})])
    batches = log.follow_batches("j", block_ms=50)
    first = await anext(batches)
    assert first is not None and [e.type for e in first] == ["status", "token"]
    assert await anext(batches) is None  # a block with nothing new
    await log.publish_many(
        "j", [("token", {"text": "b"}), ("done", {"answer": "ab"}), ("token", {"text": "x"})]
    )
    second = await anext(batches)
    assert second is not None and [e.type for e in second] == ["token", "done"]
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


async def test_follow_stops_after_error(log: EventLog) -> None:
    first = await log.publish("j", "status", {"status": "running"})
    await log.publish(
        "j", "error", {"code": "provider_unavailable", "message": "boom", "retryable": True}
    )
    items = await collect(log.follow("j", after=first, block_ms=50))
    assert [e.type for e in items if e is not None] == ["error"]


async def test_follow_resumed_from_the_terminal_event_ends_at_once(log: EventLog) -> None:
    await log.publish("j", "token", {"text": "a"})
    done = await log.publish("j", "done", {"answer": "a"})
    items = await asyncio.wait_for(collect(log.follow("j", after=done, block_ms=50)), 2)
    assert items == []


async def test_follow_heartbeats_then_continues(log: EventLog) -> None:
    await log.publish("j", "status", {"status": "queued"})
    stream = log.follow("j", block_ms=50)
    first = await anext(stream)
    assert first is not None and first.data == {"status": "queued"}
    assert await anext(stream) is None  # nothing new within one block

    async def worker() -> None:
        await asyncio.sleep(0.2)
        await log.publish("j", "token", {"text": "late"})
        await asyncio.sleep(0.2)
        await log.publish("j", "done", {"answer": "late"})

    task = asyncio.create_task(worker())
    rest = await asyncio.wait_for(collect(stream), 5)
    await task
    events = [e for e in rest if e is not None]
    assert [e.type for e in events] == ["token", "done"]
    assert rest.count(None) >= 2  # heartbeats while the worker slept
    assert rest[-1] == events[-1]


async def test_follow_gives_up_after_idle_timeout(log: EventLog) -> None:
    await log.publish("j", "status", {"status": "running"})
    loop = asyncio.get_running_loop()
    start = loop.time()
    items = await asyncio.wait_for(collect(log.follow("j", block_ms=50, idle_timeout=0.3)), 5)
    elapsed = loop.time() - start
    assert items[0] is not None and items[0].type == "status"
    assert items[1:] and all(item is None for item in items[1:])
    assert 0.25 <= elapsed < 2


async def test_read_blocks_until_timeout_or_event(log: EventLog) -> None:
    assert await log.read("j", block_ms=50) == []

    async def later() -> None:
        await asyncio.sleep(0.1)
        await log.publish("j", "token", {"text": "x"})

    task = asyncio.create_task(later())
    events = await log.read("j", block_ms=5000)
    await task
    assert [e.data for e in events] == [{"text": "x"}]


async def test_maxlen_caps_the_stream(redis: Redis) -> None:
    maxlen = 50
    log = EventLog(redis, maxlen=maxlen)
    for start in range(0, 1000, 100):
        await log.publish_many(
            "j", [("token", {"text": str(i)}) for i in range(start, start + 100)]
        )
    # ``MAXLEN ~`` only drops whole radix-tree nodes, and only while what remains stays
    # >= maxlen, so at most one node's worth (stream-node-max-entries, 100 by default)
    # minus one can remain beyond the cap; it never trims below the cap.
    config = await redis.config_get("stream-node-max-entries")
    node = int(config["stream-node-max-entries"])
    length = await redis.xlen(stream_key("j"))
    assert maxlen <= length < maxlen + node
    events = await log.read("j", count=2000)
    assert events[-1].data == {"text": "999"}  # the newest survive


async def test_ttl_is_set_and_rearmed(redis: Redis) -> None:
    log = EventLog(redis, ttl_seconds=120)
    await log.publish("j", "status", {"status": "queued"})
    assert 0 < await redis.ttl(stream_key("j")) <= 120
    await redis.expire(stream_key("j"), 5)
    await log.publish_many("j", [("token", {"text": "a"})])
    assert 5 < await redis.ttl(stream_key("j")) <= 120


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1700000000000-0", True),
        ("0-0", True),
        ("18446744073709551615-18446744073709551615", True),
        ("18446744073709551616-0", False),  # 20 digits but past 2**64 - 1
        ("123456789012345678901-0", False),
        ("1700000000000", False),
        ("1700000000000-", False),
        ("-0", False),
        ("1-0\n", False),
        (" 1-0", False),
        ("1-0-0", False),
        ("١٢-٣", False),  # non-ASCII digits
        ("abc", False),
        ("", False),
        ("$", False),
    ],
)
def test_valid_id(value: str, ok: bool) -> None:
    assert valid_id(value) is ok


async def test_unknown_job(log: EventLog) -> None:
    assert await log.read("nope") == []
    assert await log.read("nope", after="5-0") == []
    assert await log.last("nope") is None
    assert not await log.exists("nope")


async def test_bad_arguments_fail_before_redis(log: EventLog) -> None:
    with pytest.raises(ValueError, match="stream id"):
        await log.read("j", after="latest")
    with pytest.raises(ValueError, match="block_ms"):
        await log.read("j", block_ms=0)
    with pytest.raises(ValueError, match="event type"):
        await log.publish_many("j", [("token", {"text": "a"}), ("tokn", {"text": "b"})])
    assert not await log.exists("j")  # nothing from the rejected batch was written


async def test_unreachable_redis_is_translated() -> None:
    client = create_redis(make_settings(), "redis://127.0.0.1:1/0")  # nothing listens there
    try:
        log = EventLog(client)
        with pytest.raises(RedisUnavailable):
            await log.publish("j", "status", {"status": "queued"})
        with pytest.raises(RedisUnavailable):
            await log.read("j")
    finally:
        await client.aclose()


# --- the stream hub: every open stream of a process on one connection


@pytest.fixture
async def hub(redis: Redis, redis_url: str) -> AsyncIterator[StreamHub]:
    reader = create_redis(make_settings(), redis_url, max_connections=1)
    streams = StreamHub(reader, redis, max_streams=50, max_per_user=20, block_ms=200)
    streams.start()
    try:
        yield streams
    finally:
        await streams.aclose()


async def follow_all(hub: StreamHub, sub: Subscription) -> list[Event]:
    async with asyncio.timeout(10):
        return [e async for e in hub.follow(sub, heartbeat=0.1) if e is not None]


async def test_many_streams_share_one_connection_and_each_gets_its_own_events(
    hub: StreamHub, log: EventLog, redis: Redis
) -> None:
    jobs = [f"hub-{n}" for n in range(30)]
    subs = [hub.subscribe(job, f"user-{n % 3}") for n, job in enumerate(jobs)]
    readers = [asyncio.create_task(follow_all(hub, sub)) for sub in subs]
    await asyncio.sleep(0.3)  # all of them are waiting now
    clients = await redis.client_list()
    # One blocked XREAD serves the 30 streams (the test's own pool adds its connections).
    assert sum(1 for c in clients if c.get("cmd") == "xread") == 1, clients
    for n, job in enumerate(jobs):
        await log.publish_many(job, [(TOKEN, {"text": f"t{n}"}), (DONE, {"n": n})])
    results = await asyncio.gather(*readers)
    for n, events in enumerate(results):
        assert [(e.type, e.data) for e in events] == [(TOKEN, {"text": f"t{n}"}), (DONE, {"n": n})]
    assert hub.open_streams == 0


async def test_a_stream_joining_further_back_gets_everything_exactly_once(
    hub: StreamHub, log: EventLog
) -> None:
    ids = await log.publish_many("hub-late", [(TOKEN, {"i": i}) for i in range(5)])
    ahead = asyncio.create_task(follow_all(hub, hub.subscribe("hub-late", "a", after=ids[-1])))
    await asyncio.sleep(0.1)
    behind = asyncio.create_task(follow_all(hub, hub.subscribe("hub-late", "b", after=ids[1])))
    fresh = asyncio.create_task(follow_all(hub, hub.subscribe("hub-late", "c")))
    await asyncio.sleep(0.1)
    await log.publish_many("hub-late", [(TOKEN, {"i": 5}), (DONE, {})])
    assert [e.data.get("i") for e in await ahead] == [5, None]
    assert [e.data.get("i") for e in await behind] == [2, 3, 4, 5, None]
    assert [e.data.get("i") for e in await fresh] == [0, 1, 2, 3, 4, 5, None]


async def test_resuming_after_the_terminal_event_ends_at_once(
    hub: StreamHub, log: EventLog
) -> None:
    ids = await log.publish_many("hub-ended", [(TOKEN, {}), (DONE, {})])
    assert await follow_all(hub, hub.subscribe("hub-ended", "a", after=ids[-1])) == []


async def test_streams_are_capped_per_process_and_per_user(hub: StreamHub) -> None:
    held = [hub.subscribe("hub-cap", "greedy") for _ in range(20)]
    with pytest.raises(TooManyStreams, match="you have 20 event streams open"):
        hub.subscribe("hub-cap", "greedy")
    others = [hub.subscribe("hub-cap", f"u{n}") for n in range(30)]
    with pytest.raises(TooManyStreams, match="this server has 50 event streams open"):
        hub.subscribe("hub-cap", "someone-else")
    held.pop().close()
    held[0].close()
    held[0].close()  # closing twice frees one place, not two
    hub.subscribe("hub-cap", "greedy")
    assert hub.open_streams == 50 - 1
    for sub in held + others:
        sub.close()


async def test_a_subscriber_that_does_not_read_is_dropped_past_its_buffer(
    redis: Redis, redis_url: str, log: EventLog
) -> None:
    reader = create_redis(make_settings(), redis_url, max_connections=1)
    hub = StreamHub(reader, redis, max_streams=5, max_per_user=5, block_ms=200, max_pending=10)
    hub.start()
    try:
        sub = hub.subscribe("hub-slow", "a")
        stream = hub.follow(sub, heartbeat=0.1)
        assert await anext(stream) is None  # subscribed, nothing yet
        await log.publish_many("hub-slow", [(TOKEN, {"i": i}) for i in range(50)])
        await asyncio.sleep(0.5)  # the reader delivers while nobody takes
        with pytest.raises(TooManyStreams, match="not reading"):
            await anext(stream)
        assert hub.open_streams == 0
    finally:
        await hub.aclose()


async def test_a_redis_outage_ends_open_streams_with_an_error(redis: Redis, log: EventLog) -> None:
    dead = create_redis(make_settings(), "redis://127.0.0.1:1", max_connections=1)
    hub = StreamHub(dead, redis, max_streams=5, max_per_user=5, block_ms=200)
    hub.start()
    try:
        with pytest.raises(RedisUnavailable):
            await follow_all(hub, hub.subscribe("hub-down", "a"))
        assert hub.open_streams == 0
    finally:
        await hub.aclose()
