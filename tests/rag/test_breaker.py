"""The circuit breaker on a real Redis, alone and around the openai provider (fake server)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from devtools.embedded import free_port
from rag.platform.errors import ProviderRejected, ProviderUnavailable
from rag.protection.breaker import BreakerOpen, CircuitBreaker, Ticket
from rag.providers.base import ChatMessage
from rag.providers.openai import OpenAIProvider
from tests.fixtures.fake_openai import FakeServer

MESSAGES = [ChatMessage(role="user", content="What is gluten?")]
STORM = {"endpoint": "chat", "kind": "status", "status": 429, "times": 1000}


@pytest.fixture
def client(redis_client: aioredis.Redis) -> aioredis.Redis:
    return redis_client


def make_breaker(
    client: aioredis.Redis,
    *,
    failures: int = 3,
    window: float = 30,
    open_for: float = 30,
    lease: float = 30,
    name: str = "test",
) -> CircuitBreaker:
    return CircuitBreaker(
        client, name, failures=failures, window=window, open_for=open_for, probe_lease=lease
    )


async def _open(breaker: CircuitBreaker, failures: int = 3) -> None:
    for _ in range(failures):
        await breaker.failure(await breaker.admit())


# --- the breaker alone


async def test_opens_after_n_failures_in_a_row(client: aioredis.Redis) -> None:
    breaker = make_breaker(client)
    for expected in (1, 2):
        await breaker.failure(await breaker.admit())
        assert (await breaker.status()).failures == expected
    await breaker.failure(await breaker.admit())
    status = await breaker.status()
    assert status.state == "open" and 29 < status.retry_in <= 30
    with pytest.raises(BreakerOpen) as info:
        await breaker.admit()
    assert 29 < info.value.retry_in <= 30


async def test_a_success_clears_the_count(client: aioredis.Redis) -> None:
    breaker = make_breaker(client)
    for _ in range(5):
        await breaker.failure(await breaker.admit())
        await breaker.failure(await breaker.admit())
        await breaker.success(await breaker.admit())
    status = await breaker.status()
    assert status.state == "closed" and status.failures == 0


async def test_failures_older_than_the_window_do_not_count(client: aioredis.Redis) -> None:
    breaker = make_breaker(client, window=1)
    await breaker.failure(Ticket())
    await breaker.failure(Ticket())
    await asyncio.sleep(1.2)
    await breaker.failure(Ticket())
    status = await breaker.status()
    assert status.state == "closed" and status.failures == 1


async def test_every_process_sees_the_same_breaker(redis_url: str) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
    try:
        breakers = [make_breaker(c) for c in clients]
        for breaker in breakers:  # one failure from each "worker"
            await breaker.failure(await breaker.admit())
        for breaker in breakers:
            with pytest.raises(BreakerOpen):
                await breaker.admit()
        other = make_breaker(clients[0], name="another-model")
        assert (await other.admit()).probe is None  # breakers are named apart
    finally:
        for c in clients:
            await c.aclose()


async def test_half_open_lets_exactly_one_probe_through(client: aioredis.Redis) -> None:
    breaker = make_breaker(client, open_for=0.3)
    await _open(breaker)
    await asyncio.sleep(0.4)
    assert (await breaker.status()).state == "half_open"
    outcomes = await asyncio.gather(*(breaker.admit() for _ in range(20)), return_exceptions=True)
    probes = [o for o in outcomes if isinstance(o, Ticket)]
    assert len(probes) == 1 and probes[0].probe
    assert all(isinstance(o, BreakerOpen) for o in outcomes if o is not probes[0])
    # A call that was let in before the breaker opened does not close it by succeeding.
    await breaker.success(Ticket())
    with pytest.raises(BreakerOpen):
        await breaker.admit()
    await breaker.success(probes[0])
    status = await breaker.status()
    assert status.state == "closed" and status.failures == 0
    assert (await breaker.admit()).probe is None


async def test_a_failed_probe_opens_it_again(client: aioredis.Redis) -> None:
    breaker = make_breaker(client, open_for=0.3)
    await _open(breaker)
    await asyncio.sleep(0.4)
    probe = await breaker.admit()
    await breaker.failure(probe)
    status = await breaker.status()
    assert status.state == "open" and status.retry_in > 0.1
    with pytest.raises(BreakerOpen):
        await breaker.admit()
    await asyncio.sleep(0.4)
    assert (await breaker.admit()).probe  # the next period, the next probe


async def test_a_probe_that_never_reports_frees_its_place_after_its_lease(
    client: aioredis.Redis,
) -> None:
    breaker = make_breaker(client, open_for=0.2, lease=0.5)
    await _open(breaker)
    await asyncio.sleep(0.3)
    assert (await breaker.admit()).probe  # then its worker is killed
    with pytest.raises(BreakerOpen):
        await breaker.admit()
    await asyncio.sleep(0.6)
    assert (await breaker.admit()).probe


async def test_a_released_probe_frees_its_place_at_once(client: aioredis.Redis) -> None:
    breaker = make_breaker(client, open_for=0.2)
    await _open(breaker)
    await asyncio.sleep(0.3)
    await breaker.release(await breaker.admit())
    assert (await breaker.admit()).probe


async def test_without_redis_the_call_goes_through(caplog: pytest.LogCaptureFixture) -> None:
    unreachable = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
    try:
        breaker = make_breaker(unreachable)
        with caplog.at_level(logging.WARNING, logger="rag.protection.breaker"):
            assert await breaker.admit() == Ticket()
            await breaker.failure(Ticket())
        assert "letting the call through" in caplog.text
    finally:
        await unreachable.aclose()


# --- around the provider (real openai client, fake server)


@pytest.fixture
async def make_provider(
    fake_openai: FakeServer, client: aioredis.Redis
) -> AsyncIterator[Callable[..., OpenAIProvider]]:
    made: list[OpenAIProvider] = []

    def make(**env: str) -> OpenAIProvider:
        settings = fake_openai.settings(
            **{
                "BREAKER_FAILURES": "3",
                "BREAKER_OPEN_SECONDS": "30",
                "PROVIDER_MAX_ATTEMPTS": "4",
                "PROVIDER_RETRY_MAX_WAIT": "0.05",
                **env,
            }
        )
        provider = OpenAIProvider(settings, redis=client)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


async def _answer(provider: OpenAIProvider) -> str:
    return "".join([d.text async for d in provider.stream_chat(MESSAGES)])


async def test_a_429_storm_opens_the_breaker_and_calls_stop(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider()
    await fake_openai.aadd_faults(STORM)
    # The first call's retries open the breaker: its fourth attempt is never sent.
    with pytest.raises(ProviderUnavailable) as first:
        await _answer(provider)
    assert first.value.details["reason"] == "circuit_open"
    assert first.value.details["attempts"] == 3
    assert (await fake_openai.astats())["chat_calls"] == 3
    # Every call after it fails at once, with nothing sent.
    for _ in range(10):
        with pytest.raises(ProviderUnavailable) as info:
            await _answer(provider)
        assert info.value.code == "provider_unavailable" and info.value.retryable
        assert info.value.details["reason"] == "circuit_open"
        assert info.value.details["attempts"] == 0
        assert "circuit breaker open" in info.value.message
    assert (await fake_openai.astats())["chat_calls"] == 3
    # Embeddings have their own breaker, still closed.
    assert (await provider.embed(["still fine"])).shape[0] == 1


async def test_concurrent_calls_in_a_storm_stay_bounded(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider()
    await fake_openai.aadd_faults(STORM)
    results = await asyncio.gather(*(_answer(provider) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, ProviderUnavailable) for r in results)
    # Without the breaker: 10 calls x 4 attempts = 40. With it, at most the calls let in
    # before the third failure was recorded: 2 earlier failures + 10 in flight.
    calls = (await fake_openai.astats())["chat_calls"]
    assert 3 <= calls <= 12, calls
    await _answer_fails_fast(provider)
    assert (await fake_openai.astats())["chat_calls"] == calls


async def _answer_fails_fast(provider: OpenAIProvider) -> None:
    with pytest.raises(ProviderUnavailable) as info:
        await _answer(provider)
    assert info.value.details["reason"] == "circuit_open"


async def test_the_probe_closes_the_breaker_when_the_provider_is_back(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(BREAKER_OPEN_SECONDS="0.5")
    fake_openai.configure(answer="Back again.")
    await fake_openai.aadd_faults(STORM)
    with pytest.raises(ProviderUnavailable):
        await _answer(provider)
    fake_openai.reset()  # the provider recovers (counters start again from zero)
    fake_openai.configure(answer="Back again.")
    await _answer_fails_fast(provider)  # still open: nothing sent
    await asyncio.sleep(0.6)
    assert await _answer(provider) == "Back again."  # the probe
    assert (await provider.breakers["chat"].status()).state == "closed"
    assert await _answer(provider) == "Back again."
    assert (await fake_openai.astats())["chat_calls"] == 2


async def test_a_failing_probe_is_one_call_and_keeps_it_open(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(BREAKER_OPEN_SECONDS="0.5")
    await fake_openai.aadd_faults(STORM)
    with pytest.raises(ProviderUnavailable):
        await _answer(provider)
    await asyncio.sleep(0.6)
    with pytest.raises(ProviderUnavailable) as info:
        await _answer(provider)  # the probe: one attempt, then the breaker refuses retries
    assert info.value.details["attempts"] == 1
    assert (await fake_openai.astats())["chat_calls"] == 4
    assert (await provider.breakers["chat"].status()).state == "open"


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_a_rejected_request_is_not_retried_and_leaves_the_breaker_alone(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer, status: int
) -> None:
    provider = make_provider(PROVIDER_MAX_ATTEMPTS="2", BREAKER_FAILURES="5")
    await fake_openai.aadd_faults({"endpoint": "chat", "kind": "status", "status": 500, "times": 2})
    with pytest.raises(ProviderUnavailable):
        await _answer(provider)
    assert (await provider.breakers["chat"].status()).failures == 2
    for _ in range(5):  # more than BREAKER_FAILURES of them
        await fake_openai.aadd_faults({"endpoint": "chat", "kind": "status", "status": status})
        with pytest.raises(ProviderRejected):
            await _answer(provider)
    assert (await fake_openai.astats())["chat_calls"] == 2 + 5
    breaker = await provider.breakers["chat"].status()
    assert breaker.state == "closed" and breaker.failures == 2


async def test_a_rejected_probe_still_shows_the_provider_is_up(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(BREAKER_OPEN_SECONDS="0.3")
    await fake_openai.aadd_faults(STORM)
    with pytest.raises(ProviderUnavailable):
        await _answer(provider)
    fake_openai.reset()
    await asyncio.sleep(0.4)
    await fake_openai.aadd_faults({"endpoint": "chat", "kind": "status", "status": 400})
    with pytest.raises(ProviderRejected):
        await _answer(provider)
    assert (await provider.breakers["chat"].status()).state == "closed"


async def test_timeouts_count_as_failures(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_FIRST_TOKEN_TIMEOUT="0.2", BREAKER_FAILURES="2")
    await fake_openai.aadd_faults({"endpoint": "chat", "kind": "hang", "seconds": 30, "times": 10})
    with pytest.raises(ProviderUnavailable) as info:
        await _answer(provider)
    assert info.value.details["reason"] == "circuit_open"
    assert (await fake_openai.astats())["chat_calls"] == 2


async def test_a_stream_cut_midway_counts_as_a_failure(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider()
    fake_openai.configure(answer="one two three four five six")
    await fake_openai.aadd_faults({"endpoint": "chat", "kind": "cut", "after_pieces": 2})
    with pytest.raises(ProviderUnavailable, match="interrupted after 2 pieces"):
        await _answer(provider)
    assert (await provider.breakers["chat"].status()).failures == 1


async def test_breaker_failures_zero_turns_it_off(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(BREAKER_FAILURES="0", PROVIDER_MAX_ATTEMPTS="3")
    assert provider.breakers == {}
    await fake_openai.aadd_faults(STORM)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable) as info:
            await _answer(provider)
        assert info.value.details["status"] == 429
    assert (await fake_openai.astats())["chat_calls"] == 6


async def test_a_provider_that_cuts_every_stream_opens_the_breaker(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    """The first piece of a stream is no success: only a finished stream is. Before,
    each cut stream's first piece cleared the count and 20 of 20 reached the provider."""
    provider = make_provider()  # BREAKER_FAILURES=3
    fake_openai.configure(answer="one two three four five six")
    await fake_openai.aadd_faults(
        {"endpoint": "chat", "kind": "cut", "after_pieces": 2, "times": 20}
    )
    reasons = []
    for _ in range(20):
        with pytest.raises(ProviderUnavailable) as info:
            await _answer(provider)
        reasons.append(info.value.details.get("reason"))
    assert (await fake_openai.astats())["chat_calls"] == 3
    assert reasons == ["connection"] * 3 + ["circuit_open"] * 17
    assert (await provider.breakers["chat"].status()).state == "open"


async def test_a_finished_stream_is_what_clears_the_count(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider()
    fake_openai.configure(answer="one two three four")
    cuts = {"endpoint": "chat", "kind": "cut", "after_pieces": 1, "times": 2}
    await fake_openai.aadd_faults(cuts)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await _answer(provider)
    assert (await provider.breakers["chat"].status()).failures == 2
    assert await _answer(provider) == "one two three four"
    assert (await provider.breakers["chat"].status()).failures == 0


async def test_a_gap_timeout_midway_counts_as_a_failure(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_STREAM_GAP_TIMEOUT="0.2")
    fake_openai.configure(answer="one two three", token_delay=0.6)
    with pytest.raises(ProviderUnavailable, match="stalled"):
        await _answer(provider)
    assert (await provider.breakers["chat"].status()).failures == 1


async def test_a_consumer_that_stops_early_gives_no_verdict(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    """Stopping to read (a cancelled job) says nothing about the provider, and a probe
    that stops early frees its place at once instead of holding it for its lease."""
    provider = make_provider(BREAKER_OPEN_SECONDS="0.3")
    await fake_openai.aadd_faults(STORM)
    with pytest.raises(ProviderUnavailable):
        await _answer(provider)
    fake_openai.reset()
    fake_openai.configure(answer="one two three four")
    await asyncio.sleep(0.4)
    stream = provider.stream_chat(MESSAGES)
    assert (await anext(stream)).text == "one"  # the probe
    await stream.aclose()
    breaker = provider.breakers["chat"]
    assert (await breaker.status()).state == "half_open"
    assert await _answer(provider) == "one two three four"  # the next probe, let through
    assert (await breaker.status()).state == "closed"
