"""Single flight: one generation for identical questions asked at once.

On a cache miss, a question whose prompt holds no learner history claims a Redis
key named by course, content version, embedder and canonical question (``SET
NX`` for :data:`FLIGHT_TTL`). The holder, the *leader*, generates; a job that
finds the key taken relays the leader's events into its own stream and stores
the leader's answer as its own (``rag.answering.answers``), or answers by itself when the
leader fails or stays silent for :data:`FLIGHT_IDLE_SECONDS`. A leader that
answered keeps its key :data:`FLIGHT_LINGER` seconds, pointing at its finished
job: it stored the answer in the semantic cache first, so a job whose cache
lookup ran just before that store still finds a leader and replays its finished
stream instead of generating again; later jobs find the answer in the cache.
"""

from __future__ import annotations

from redis.asyncio import Redis

from rag.answering.semantic_cache import Scope, question_hash

#: How long a leader owns an in-flight question.
FLIGHT_TTL = 300
#: How long a follower waits with no event from its leader before answering by itself.
FLIGHT_IDLE_SECONDS = 30
#: How long a leader that answered keeps its key (see the module docstring).
FLIGHT_LINGER = 60


def flight_key(scope: Scope, question: str) -> str:
    gate = f"{scope.gate}:" if scope.gate else ""
    return f"flight:{scope.course_id}:{scope.version}:{scope.model}:{gate}{question_hash(question)}"


async def claim(redis: Redis, key: str, job: str) -> str | None:
    """Lead the flight (None), or the id of the job already leading it. A flight
    that is this job's own (a second run of it) is led again."""
    if await redis.set(key, job, nx=True, ex=FLIGHT_TTL):
        return None
    leader = await redis.get(key)
    if leader is None or leader.decode() == job:
        return None
    return str(leader.decode())


async def release(redis: Redis, key: str, job: str, *, answered: bool) -> None:
    """End this job's lead: keep the key a while after an answer, else drop it (only
    if it is still this job's)."""
    if await redis.get(key) != job.encode():
        return
    if answered:
        await redis.expire(key, FLIGHT_LINGER)
    else:
        await redis.delete(key)
