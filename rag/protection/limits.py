"""Distributed rate limits and queue admission: GCRA in one Redis script.

Each limit is a GCRA bucket (generic cell rate algorithm): at most ``burst``
requests at once, refilled at a sustained rate. Redis keeps one number per
bucket, its theoretical arrival time (TAT); a request conforms if charging it
would not push the TAT more than ``burst`` emission intervals past now.

One script call (``EVALSHA``, loaded again by redis-py if Redis lost it) checks
every limit a request has and, optionally, the depth of the arq queue: atomic
across all API processes, on Redis's clock (``TIME`` inside the script, so the
API hosts' clocks do not matter), and all-or-nothing: if any bucket refuses,
none is charged. A bucket's key expires when the bucket is full again, so idle
users cost no memory. A limit's settings can change while its keys live (a
deploy, an operator lowering then raising a limit): a stored TAT is capped at
what the current limit can schedule (an empty bucket), so state stored under a
slower limit never outlives the change.

Written here rather than taken from a library: the well-kept Python ones
(``limits``, ``throttled-py``, ``pyrate-limiter``) check one key per call, so
"user and course, or neither" plus the queue-depth cap would take several round
trips and could charge one bucket while another refuses; the script is short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rag.platform.redis import Redis, translated

#: KEYS[1..n]: buckets (each holds its TAT in microseconds of Redis time);
#: KEYS[n+1]: the queue (a sorted set), read only when the cap ARGV[2] > 0;
#: then b budget counters (tokens used today, ``rag/learners/usage.py``).
#: ARGV[1] = n, ARGV[2] = queue cap, then per bucket: emission interval (µs), burst;
#: then b, and per budget its limit.
#: Reply: {status, depth, then per bucket: remaining, reset_us, retry_us};
#: status 0 = admitted (every bucket charged), 1 = refused by a bucket (none
#: charged), 2 = the queue is full (no bucket read or charged), 3 = a budget is
#: spent: {3, which budget, tokens used, seconds to 00:00 UTC} (no bucket charged).
#: Numbers stay integers below 2^53, exact in Lua's doubles; TATs are written
#: with %d because tostring() would keep only 14 digits.
_GCRA = """
local n = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local q = 0
if cap > 0 then
  q = 1
  local depth = redis.call('ZCARD', KEYS[n + 1])
  if depth >= cap then
    return {2, depth}
  end
end
local time = redis.call('TIME')
local b = tonumber(ARGV[3 + 2 * n] or '0')
for j = 1, b do
  local used = tonumber(redis.call('GET', KEYS[n + q + j]) or '0')
  if used >= tonumber(ARGV[3 + 2 * n + j]) then
    return {3, j, used, 86400 - (tonumber(time[1]) % 86400)}
  end
end
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local reply = {0, 0}
local tats = {}
for i = 1, n do
  local interval = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then
    tat = now
  end
  -- A TAT stored under another limit (a slower rate, a bigger burst) may lie further
  -- ahead than this limit can ever schedule: an empty bucket under this one, stored
  -- as such (not a charge), so that it refills from here at this limit's rate.
  if tat > now + burst * interval then
    tat = now + burst * interval
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
  end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    reply[1] = 1
    reply[#reply + 1] = 0
    reply[#reply + 1] = tat - now
    reply[#reply + 1] = allow_at - now
  else
    tats[i] = new_tat
    reply[#reply + 1] = math.floor((now - allow_at) / interval)
    reply[#reply + 1] = new_tat - now
    reply[#reply + 1] = 0
  end
end
if reply[1] == 0 then
  for i = 1, n do
    redis.call('SET', KEYS[i], string.format('%d', tats[i]),
               'PX', math.ceil((tats[i] - now) / 1000))
  end
end
return reply
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket: ``burst`` requests at once, refilled at ``per_second``."""

    key: str
    per_second: float
    burst: int

    @classmethod
    def per_minute(cls, key: str, count: int, burst: int) -> Limit:
        return cls(key, count / 60, burst)

    @property
    def interval_us(self) -> int:
        """The emission interval: microseconds per request at the sustained rate."""
        return max(1, round(1_000_000 / self.per_second))


@dataclass(frozen=True, slots=True)
class Quota:
    """A bucket as a check left it."""

    limit: Limit
    #: Requests that would conform right now (after this one, if it was admitted).
    remaining: int
    #: Seconds until the bucket is full again.
    reset: float
    #: Seconds until one more request conforms; 0 if this one did.
    retry_after: float


@dataclass(frozen=True, slots=True)
class Budget:
    """A daily token budget: the counter ``key`` holds today's tokens, up to ``limit``."""

    key: str
    limit: int
    #: What it budgets, for the refusal: ``user`` or ``course``.
    scope: str


@dataclass(frozen=True, slots=True)
class Spent:
    """The budget that refused a request, what it holds, and when it resets."""

    budget: Budget
    used: int
    #: Seconds until 00:00 UTC (Redis's clock), when a new day's counter starts.
    resets_in: int


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    quotas: tuple[Quota, ...] = ()
    #: The queue's depth when the queue cap refused the request, else None.
    queue_depth: int | None = None
    #: The budget that refused the request, else None.
    spent: Spent | None = None

    @property
    def overloaded(self) -> bool:
        return self.queue_depth is not None

    @property
    def retry_after(self) -> float:
        return max((q.retry_after for q in self.quotas), default=0.0)

    def binding(self) -> Quota | None:
        """The quota a client should hear about: the refusing one that frees up
        last, or, when admitted, the one closest to running out."""
        if not self.quotas:
            return None
        if not self.admitted:
            return max(self.quotas, key=lambda q: (q.retry_after, q.reset))
        return min(self.quotas, key=lambda q: (q.remaining, -q.reset))


class Limiter:
    """Checks limits in one round trip; one per process, over the process's client."""

    def __init__(self, client: Redis) -> None:
        # register_script: EVALSHA, and SCRIPT LOAD then EVALSHA again on NOSCRIPT
        # (a restarted or flushed Redis), so the script text is sent once.
        self._script = client.register_script(_GCRA)

    async def check(
        self,
        limits: Sequence[Limit],
        *,
        queue: str | None = None,
        max_depth: int = 0,
        budgets: Sequence[Budget] = (),
    ) -> Decision:
        """Charge every limit or none; refuse first if ``queue`` holds ``max_depth``
        jobs or more (``max_depth`` 0: no cap), then if a budget's counter reached its
        limit. Raises :class:`RedisUnavailable`."""
        keys = [limit.key for limit in limits]
        cap = 0
        if queue is not None and max_depth > 0:
            keys.append(queue)
            cap = max_depth
        keys += [budget.key for budget in budgets]
        if not keys:
            return Decision(True)
        args: list[int] = [len(limits), cap]
        for limit in limits:
            args += [limit.interval_us, limit.burst]
        args += [len(budgets), *(budget.limit for budget in budgets)]
        async with translated():
            reply = await self._script(keys=keys, args=args)
        status, depth = int(reply[0]), int(reply[1])
        if status == 2:
            return Decision(False, queue_depth=depth)
        if status == 3:
            spent = Spent(budgets[depth - 1], used=int(reply[2]), resets_in=int(reply[3]))
            return Decision(False, spent=spent)
        quotas = tuple(
            Quota(
                limit,
                remaining=int(reply[2 + 3 * i]),
                reset=int(reply[3 + 3 * i]) / 1e6,
                retry_after=int(reply[4 + 3 * i]) / 1e6,
            )
            for i, limit in enumerate(limits)
        )
        return Decision(status == 0, quotas)


def whole_seconds(seconds: float) -> int:
    """Seconds for a header: rounded up, so a client that waits that long is not early."""
    return max(0, math.ceil(seconds))
