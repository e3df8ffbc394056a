"""The queue contract between the API and the workers, in one place (as arq keeps its
own prefixes in ``arq/constants.py``): the queue both sides use, the names of the
jobs on it, and the Redis keys both sides read and write for a job (its event
stream, its cancel flag) and for a worker (its heartbeat). The API enqueues on the
queue, ``api/limits.py`` reads its depth, the worker consumes it and the reconciler
re-enqueues on it. Keys that one module alone uses stay with it (rate limits in
``api/limits.py``, breakers in ``rag/protection/breaker.py``, single flight in
``rag/answering/flight.py``, model slots in ``rag/protection/concurrency.py``, caches
beside theirs)."""

from __future__ import annotations

import logging
import uuid
from typing import Final

import redis.exceptions

from rag.platform.redis import Redis

log = logging.getLogger("rag.queue")

#: The arq queue (a Redis sorted set) of every job: arq's default queue, spelled here
#: so that rag/ stays free of arq (tests/workers/test_jobs.py keeps the two equal).
QUEUE_NAME: Final = "arq:queue"
#: The queue's wake-up list: arq has no blocking pop, so an idle worker polls; instead
#: of every 10 ms it blocks on this list (``BLPOP``) between polls, and the API pushes
#: a token after each question it enqueues (:func:`wake_workers`).
WAKE_KEY: Final = "arq:queue:wake"
#: Tokens kept at most: each wakes one idle worker for one poll, so more than a few
#: dozen waiting serve nobody (no worker up to take them, or a burst already taken).
WAKE_TOKENS: Final = 64
#: Job functions, by the name the worker registers them under.
ANSWER_QUESTION: Final = "answer_question"
REINDEX_COURSE: Final = "reindex_course"
UPDATE_CHAT_SUMMARY: Final = "update_chat_summary"


def stream_key(job_id: str) -> str:
    """A job's event stream: the worker appends, the API replays and follows."""
    return f"job:{job_id}:events"


def cancel_key(job_id: uuid.UUID | str) -> str:
    """A running job's cancel flag: the API sets it, the worker polls it between
    token batches."""
    return f"job:{job_id}:cancel"


def worker_key(worker_id: str) -> str:
    """A worker's heartbeat: the worker keeps it alive, the reconciler reads it."""
    return f"worker:{worker_id}:alive"


async def wake_workers(client: Redis) -> None:
    """Wake one idle worker to poll the queue now (one round trip, two commands).

    Best effort: the job is already queued, and a worker that is not woken finds
    it at its next poll anyway (``workers.jobs.ReconnectingWorker.idle_wait``).
    So a failure here is logged, not raised into the request that enqueued."""
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.lpush(WAKE_KEY, b"1")
            pipe.ltrim(WAKE_KEY, 0, WAKE_TOKENS - 1)
            await pipe.execute()
    except redis.exceptions.RedisError as exc:
        log.warning("could not wake a worker (%s): the job starts at its next poll", exc)
