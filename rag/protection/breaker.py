"""A circuit breaker around the model provider, shared by every worker through Redis.

Closed, it lets calls through and counts failures (429, 5xx, timeouts,
connection errors: the caller decides what counts). ``BREAKER_FAILURES`` of
them in a row, each within ``BREAKER_WINDOW_SECONDS`` of the last, open it:
for ``BREAKER_OPEN_SECONDS`` every call fails at once, with no request sent.
Then it is half-open: exactly one call (the probe) goes through while the rest
still fail fast; the probe's success closes the breaker, its failure opens it
for another period. A success while closed clears the count, so a busy,
healthy provider's occasional error never adds up to an open breaker.

Every transition is one Lua script on the server's clock, so workers on
different machines agree without locks, and a probe that dies (a killed
worker) frees its place after a lease instead of keeping the breaker
half-open forever.

Why not a library: ``purgatory`` (the maintained async breaker with a Redis
backend) reads and writes its state in separate commands (two workers can
both decide to open, or both probe), lets every caller through while
half-open, counts consecutive failures with no window, and opens its own
Redis client instead of the process's bounded pool. ``aiobreaker`` and
``pybreaker`` keep state in memory or use the synchronous client. The
behaviour needed here is a few short scripts.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Literal, cast

import redis.exceptions
from redis.commands.core import AsyncScript

from rag.platform.redis import Redis, as_text
from rag.platform.settings import Settings

log = logging.getLogger("rag.protection.breaker")

State = Literal["closed", "open", "half_open"]

#: State hash fields: ``until`` (ms, end of the open period), ``probe`` (token of the
#: call testing the provider) and ``probe_until`` (ms, end of that call's lease).
#: Failures are a sorted set of timestamps. The state expires a day after its last
#: write (KEEP, ms), so a breaker nobody uses leaves nothing behind.
_NOW = """
local KEEP = 86400000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: state, failures. ARGV: probe token, probe lease (ms).
# Returns {verdict, ms}: closed | probe (let through), open | probing (refused, ms to wait).
_ADMIT = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then
  return {'closed', 0}
end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'until'))
if now < open_until then
  return {'open', open_until - now}
end
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if now < probe_until then
  return {'probing', probe_until - now}
end
redis.call('HSET', KEYS[1], 'probe', ARGV[1], 'probe_until', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], KEEP)
return {'probe', 0}
"""
)

# KEYS: state, failures. ARGV: probe token ('' if none), threshold, window ms, open ms,
# unique member. Returns opened | reopened | counted | ignored.
_FAILURE = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') == 'open' then
  if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[4]))
    redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
    redis.call('PEXPIRE', KEYS[1], KEEP)
    return 'reopened'
  end
  return 'ignored'
end
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', now + tonumber(ARGV[4]))
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
  redis.call('PEXPIRE', KEYS[1], KEEP)
  return 'opened'
end
return 'counted'
"""
)

# KEYS: state, failures. ARGV: probe token ('' if none). Returns closed | ignored.
_SUCCESS = """
if redis.call('HGET', KEYS[1], 'state') == 'open' then
  if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
    redis.call('DEL', KEYS[1], KEYS[2])
    return 'closed'
  end
  return 'ignored'
end
redis.call('DEL', KEYS[2])
return 'closed'
"""

# KEYS: state. ARGV: probe token. A probe that ended with no verdict gives its place up.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
end
return 0
"""

# KEYS: state, failures. ARGV: window ms. Returns {state, failures, ms until half-open}.
_STATE = (
    _NOW
    + """
local failures = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[1]), '+inf')
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then
  return {'closed', failures, 0}
end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'until'))
if now < open_until then
  return {'open', 0, open_until - now}
end
return {'half_open', 0, 0}
"""
)


class BreakerOpen(Exception):
    """The breaker refused a call; nothing was sent to the provider."""

    def __init__(self, name: str, retry_in: float, *, probing: bool = False) -> None:
        why = "another call is testing the provider" if probing else "the provider failed"
        super().__init__(f"circuit breaker {name} is open ({why}); retry in {retry_in:.1f}s")
        self.name = name
        self.retry_in = retry_in


@dataclass(frozen=True, slots=True)
class Ticket:
    """Admission for one call. ``probe`` is set when this call decides, by its outcome,
    whether a half-open breaker closes or opens again."""

    probe: str | None = None


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    state: State
    #: Failures counted towards opening (closed only).
    failures: int
    #: Seconds until a probe may go through (open only).
    retry_in: float


class CircuitBreaker:
    """One named breaker; every process that builds one with the same name shares it.

    A Redis error inside the breaker never blocks a call: it is logged and the
    call goes through (fail open), since the breaker only protects the provider.
    """

    def __init__(
        self,
        redis: Redis,
        name: str,
        *,
        failures: int,
        window: float,
        open_for: float,
        probe_lease: float,
    ) -> None:
        self.name = name
        # The braces are a cluster hash tag: both keys live in the same slot.
        self._keys = [f"breaker:{{{name}}}", f"breaker:{{{name}}}:failures"]
        self._threshold = failures
        self._window_ms = max(int(window * 1000), 1)
        self._open_ms = max(int(open_for * 1000), 1)
        self._lease_ms = max(int(probe_lease * 1000), 1)
        self._admit = redis.register_script(_ADMIT)
        self._failure = redis.register_script(_FAILURE)
        self._success = redis.register_script(_SUCCESS)
        self._release = redis.register_script(_RELEASE)
        self._state = redis.register_script(_STATE)

    async def admit(self) -> Ticket:
        """Let a call through (as the probe, when half-open) or raise :class:`BreakerOpen`."""
        token = uuid.uuid4().hex
        try:
            verdict, wait_ms = await self._admit(keys=self._keys, args=[token, self._lease_ms])
        except redis.exceptions.RedisError as exc:
            log.warning(
                "circuit breaker %s unavailable (%s); letting the call through", self.name, exc
            )
            return Ticket()
        verdict = as_text(verdict)
        if verdict == "closed":
            return Ticket()
        if verdict == "probe":
            log.info("circuit breaker %s half-open: one call tests the provider", self.name)
            return Ticket(probe=token)
        raise BreakerOpen(self.name, int(wait_ms) / 1000, probing=verdict == "probing")

    async def success(self, ticket: Ticket) -> None:
        """The provider served the call: clear the failure count, or close after a probe."""
        outcome = await self._run(self._success, [ticket.probe or ""])
        if ticket.probe and outcome == "closed":
            log.warning("circuit breaker %s closed: the provider answered the probe", self.name)

    async def failure(self, ticket: Ticket) -> None:
        """The call failed in a way that counts (429, 5xx, timeout, connection)."""
        outcome = await self._run(
            self._failure,
            [
                ticket.probe or "",
                self._threshold,
                self._window_ms,
                self._open_ms,
                uuid.uuid4().hex,
            ],
        )
        if outcome == "opened":
            log.warning(
                "circuit breaker %s opened after %d failures in a row; provider calls fail "
                "at once for %.1fs",
                self.name,
                self._threshold,
                self._open_ms / 1000,
            )
        elif outcome == "reopened":
            log.warning(
                "circuit breaker %s: the probe failed; open for another %.1fs",
                self.name,
                self._open_ms / 1000,
            )

    async def release(self, ticket: Ticket) -> None:
        """A call that ended with no verdict (cancelled, a bug): a probe gives its place up."""
        if ticket.probe:
            await self._run(self._release, [ticket.probe], keys=self._keys[:1])

    async def status(self) -> BreakerStatus:
        """The shared state as every worker sees it (operators, tests)."""
        state, failures, wait_ms = await self._state(keys=self._keys, args=[self._window_ms])
        name = as_text(state)
        if name not in ("closed", "open", "half_open"):
            raise ValueError(f"unexpected breaker state {name!r}")
        return BreakerStatus(cast(State, name), int(failures), int(wait_ms) / 1000)

    async def _run(
        self, script: AsyncScript, args: list[str | int], *, keys: list[str] | None = None
    ) -> str | None:
        try:
            result = await script(keys=self._keys if keys is None else keys, args=args)
        except redis.exceptions.RedisError as exc:
            log.warning("circuit breaker %s could not record an outcome: %s", self.name, exc)
            return None
        return as_text(result)


def provider_breakers(settings: Settings, redis: Redis) -> dict[str, CircuitBreaker]:
    """The OpenAI-compatible provider's breakers, one per operation and model (the
    provider limits, and fails, them apart; an embeddings success must not clear a
    run of chat failures). Empty when ``BREAKER_FAILURES`` is 0. The provider uses
    them, and ``/ready`` reads their state with no provider call."""
    if settings.breaker_failures <= 0:
        return {}
    # A probe holds its place until it has a verdict: a chat probe's comes at the end
    # of its stream (at most the whole generation's limit), an embeddings probe's with
    # the response.
    waits = {
        "chat": settings.provider_generation_timeout,
        "embeddings": settings.provider_read_timeout,
    }
    models = {"chat": settings.chat_model, "embeddings": settings.embedding_model}
    return {
        operation: CircuitBreaker(
            redis,
            f"openai:{operation}:{models[operation]}",
            failures=settings.breaker_failures,
            window=settings.breaker_window_seconds,
            open_for=settings.breaker_open_seconds,
            probe_lease=settings.provider_connect_timeout + 1 + waits[operation],
        )
        for operation in ("chat", "embeddings")
    }
