"""The Redis client's pools: their connections pack commands with hiredis and send
exactly what redis-py's own packer would."""

from __future__ import annotations

from typing import Any

import pytest
import redis.exceptions
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import SentinelManagedConnection

from rag.platform.redis import create_pool, create_redis, hiredis_packing
from tests.fixtures.services import make_settings

STREAMS = [f"events:{n:08x}-0000-4000-8000-000000000000" for n in range(50)]
COMMANDS: list[tuple[Any, ...]] = [
    # The event-stream reader's read over many streams: keys, then cursors.
    ("XREAD", "COUNT", 100, "BLOCK", 5000, "STREAMS", *STREAMS, *["0-0"] * 50),
    # A script call as the rate limits make it: ints, floats, bytes keys.
    ("EVALSHA", "0" * 40, 2, b"limit:u1", b"limit:c1", 10, 60, 1765000000.123456, -0.5),
    ("SET", b"cache:\x00\xff", memoryview(b"raw bytes"), "EX", 3600),
    ("SET", "answer", "é, 日本語 and an emoji 🙂"),
    ("SET", "big", b"x" * 70_000),  # past redis-py's buffer cutoff: it splits such values
    ("CONFIG GET", "maxmemory"),  # a command of two words is sent as two arguments
    (b"CLIENT SETNAME", b"worker"),
    ("ZADD", "queue", 1e22, "job", 2.5e-05, "other"),
]


def _packed(connection: AbstractConnection, *args: Any) -> bytes:
    return b"".join(bytes(part) for part in connection.pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: str(args[0]))
def test_a_command_is_sent_as_redis_py_packs_it(args: tuple[Any, ...]) -> None:
    python = Connection()  # redis-py's asyncio connection: its own packer, in Python
    hiredis = hiredis_packing(Connection)()
    assert _packed(hiredis, *args) == _packed(python, *args)


def test_a_pipeline_is_sent_as_redis_py_packs_it() -> None:
    python, hiredis = Connection(), hiredis_packing(Connection)()
    joined = [b"".join(bytes(p) for p in c.pack_commands(COMMANDS)) for c in (python, hiredis)]
    assert joined[1] == joined[0]


@pytest.mark.parametrize("value", [None, True, 1 + 2j, bytearray(b"x")], ids=repr)
def test_a_value_redis_cannot_take_is_refused_before_it_is_sent(value: object) -> None:
    with pytest.raises(redis.exceptions.DataError):
        hiredis_packing(Connection)().pack_command("SET", "key", value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "chosen"),
    [
        ("redis://localhost:6379/0", Connection),
        ("rediss://localhost:6380/0", SSLConnection),
        ("unix:///run/redis.sock", UnixDomainSocketConnection),
    ],
)
def test_every_pool_keeps_the_connection_class_its_url_chose(url: str, chosen: type) -> None:
    pool = create_pool(make_settings(), url)
    assert issubclass(pool.connection_class, chosen)
    assert pool.connection_class is hiredis_packing(chosen)
    assert pool.connection_class is not chosen


def test_a_sentinel_pool_keeps_its_sentinel_managed_connections() -> None:
    settings = make_settings(REDIS_SENTINELS="127.0.0.1:1", REDIS_URL="redis://x/0")
    pool = create_pool(settings, "redis://x/0")
    assert issubclass(pool.connection_class, SentinelManagedConnection)
    assert pool.connection_class is hiredis_packing(SentinelManagedConnection)


async def test_commands_and_pipelines_round_trip_through_redis(redis_url: str) -> None:
    client = create_redis(make_settings(), redis_url)
    try:
        text = "é, 日本語 and an emoji 🙂"
        assert await client.set("answer", text.encode(), ex=60)
        async with client.pipeline(transaction=True) as pipe:
            pipe.get("answer")
            pipe.incrbyfloat("score", 0.25)
            pipe.xadd("events:a", {"type": "token"})
            got, score, entry = await pipe.execute()
        assert got.decode() == text and float(score) == 0.25
        reply = await client.xread({"events:a": "0-0", "events:b": "0-0"}, count=10)
        assert [(key, [e[0] for e in entries]) for key, entries in reply] == [
            (b"events:a", [entry])
        ]
    finally:
        await client.aclose()
