"""The GCRA script on a real Redis: bursts, refill on Redis's clock, all-or-nothing, expiry."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from devtools.embedded import free_port
from rag.platform.errors import RedisUnavailable
from rag.protection.limits import Budget, Limit, Limiter

#: One request a minute: nothing refills while a test runs.
SLOW = 1 / 60


@pytest.fixture
def client(redis_client: aioredis.Redis) -> aioredis.Redis:
    return redis_client


@pytest.fixture
def limiter(client: aioredis.Redis) -> Limiter:
    return Limiter(client)


async def test_a_burst_is_admitted_then_refused_with_when_to_retry(limiter: Limiter) -> None:
    limit = Limit("rl:test", per_second=SLOW, burst=3)
    decisions = [await limiter.check([limit]) for _ in range(4)]
    assert [d.admitted for d in decisions] == [True, True, True, False]
    assert [d.quotas[0].remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[-1].quotas[0]
    # The next request conforms one emission interval (60 s) after the first.
    assert 50 < refused.retry_after <= 60
    assert decisions[-1].retry_after == refused.retry_after
    # Full again once all three intervals have passed.
    assert 170 < decisions[2].quotas[0].reset <= 180


async def test_the_bucket_refills_on_redis_time(limiter: Limiter, client: aioredis.Redis) -> None:
    limit = Limit("rl:refill", per_second=2, burst=2)  # one more every 0.5 s
    assert (await limiter.check([limit])).admitted
    assert (await limiter.check([limit])).admitted
    refused = await limiter.check([limit])
    assert not refused.admitted and 0 < refused.retry_after <= 0.5
    # The stored arrival time is in microseconds of Redis's clock, not this host's.
    seconds, micros = await client.time()
    stored = int(await client.get("rl:refill"))
    assert 0 < stored - (seconds * 1_000_000 + micros) <= 1_000_000
    await asyncio.sleep(refused.retry_after + 0.05)
    assert (await limiter.check([limit])).admitted


async def test_several_limits_are_charged_all_or_nothing(
    limiter: Limiter, client: aioredis.Redis
) -> None:
    user = Limit("rl:user", per_second=SLOW, burst=5)
    course = Limit("rl:course", per_second=SLOW, burst=1)
    first = await limiter.check([user, course])
    assert first.admitted
    # The quota a client hears about is the one closest to running out.
    binding = first.binding()
    assert binding is not None and binding.limit == course and binding.remaining == 0
    user_tat = await client.get("rl:user")
    second = await limiter.check([user, course])
    assert not second.admitted
    refused = second.binding()
    assert refused is not None and refused.limit == course
    # The course refused, so the user's bucket was not charged either.
    assert await client.get("rl:user") == user_tat
    alone = await limiter.check([user])
    assert alone.admitted and alone.quotas[0].remaining == 3


async def test_keys_expire_once_their_bucket_is_full_again(
    limiter: Limiter, client: aioredis.Redis
) -> None:
    limit = Limit("rl:expiry", per_second=10, burst=3)  # full 0.1 s after one request
    assert (await limiter.check([limit])).admitted
    assert 0 < await client.pttl("rl:expiry") <= 100
    slow = Limit("rl:slow", per_second=SLOW, burst=3)
    assert (await limiter.check([slow])).admitted
    assert 59_000 < await client.pttl("rl:slow") <= 60_000
    await asyncio.sleep(0.3)
    assert await client.exists("rl:expiry") == 0


async def test_a_full_queue_refuses_before_any_bucket_is_charged(
    limiter: Limiter, client: aioredis.Redis
) -> None:
    await client.zadd("q", {"a": 1, "b": 2, "c": 3})
    limit = Limit("rl:q", per_second=SLOW, burst=2)
    full = await limiter.check([limit], queue="q", max_depth=3)
    assert not full.admitted and full.overloaded and full.queue_depth == 3
    assert await client.exists("rl:q") == 0
    room = await limiter.check([limit], queue="q", max_depth=4)
    assert room.admitted and not room.overloaded
    # The cap alone, without any rate limit; 0 turns it off.
    assert (await limiter.check([], queue="q", max_depth=3)).overloaded
    assert (await limiter.check([], queue="q", max_depth=0)).admitted


async def test_the_script_is_loaded_again_after_redis_forgot_it(
    limiter: Limiter, client: aioredis.Redis
) -> None:
    limit = Limit("rl:reload", per_second=SLOW, burst=2)
    assert (await limiter.check([limit])).admitted
    await client.script_flush()
    again = await limiter.check([limit])
    assert again.admitted and again.quotas[0].remaining == 0


async def test_no_limits_cost_no_round_trip() -> None:
    # A client for a port nobody listens on: any command would fail.
    nowhere = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert (await Limiter(nowhere).check([])).admitted
        with pytest.raises(RedisUnavailable):
            await Limiter(nowhere).check([Limit("rl:x", per_second=1, burst=1)])
    finally:
        await nowhere.aclose()


async def test_state_stored_under_a_slower_limit_does_not_outlive_a_change(
    limiter: Limiter,
) -> None:
    """An operator sets a course to 1 a minute, then back: the old schedule (ten
    minutes ahead) must not keep refusing under the new limit. Before, it answered
    "try again in 590 s" under a limit of 60 a minute."""
    slow = Limit("rl:changed", per_second=SLOW, burst=10)
    assert all([(await limiter.check([slow])).admitted for _ in range(10)])
    refused = await limiter.check([slow])
    assert not refused.admitted and refused.retry_after > 50
    back = Limit("rl:changed", per_second=1, burst=10)
    after = await limiter.check([back])
    # At most an empty bucket under the new limit: one request a second from now.
    assert after.admitted or after.retry_after <= 1.0, after
    assert after.quotas[0].reset <= 10.0 + 1e-6
    # And it refills at the new rate.
    await asyncio.sleep(1.1)
    assert (await limiter.check([back])).admitted


async def test_a_spent_budget_refuses_before_any_bucket_is_charged(
    limiter: Limiter, client: aioredis.Redis
) -> None:
    bucket = Limit("rl:budgeted", per_second=SLOW, burst=5)
    user = Budget("budget:tokens:user:ann:20261203", 1000, "user")
    course = Budget("budget:tokens:course:7:20261203", 5000, "course")
    # Nothing used yet (no counters): admitted, and the bucket charged.
    first = await limiter.check([bucket], budgets=[user, course])
    assert first.admitted and first.spent is None and first.quotas[0].remaining == 4
    await client.set(course.key, 5000)
    await client.set(user.key, 999)
    refused = await limiter.check([bucket], budgets=[user, course])
    assert not refused.admitted and refused.spent is not None
    assert (refused.spent.budget, refused.spent.used) == (course, 5000)
    assert 0 < refused.spent.resets_in <= 86400
    await client.set(user.key, 1200)
    assert (await limiter.check([bucket], budgets=[user, course])).spent.budget == user  # type: ignore[union-attr]
    # No bucket was charged by the refusals; with the counters gone it is admitted.
    await client.delete(user.key, course.key)
    again = await limiter.check([bucket], budgets=[user, course])
    assert again.admitted and again.quotas[0].remaining == 3


async def test_budgets_are_read_after_the_queue_cap_and_alone(
    limiter: Limiter, client: aioredis.Redis
) -> None:
    user = Budget("budget:tokens:user:bo:20261203", 10, "user")
    await client.set(user.key, 10)
    assert (await limiter.check([], budgets=[user])).spent is not None
    await client.zadd("arq:queue:test", {"a": 1, "b": 2})
    full = await limiter.check([], queue="arq:queue:test", max_depth=2, budgets=[user])
    assert full.overloaded and full.spent is None
