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

import uuid
from typing import Final

#: The arq queue (a Redis sorted set) of every job: arq's default queue, spelled here
#: so that rag/ stays free of arq (tests/workers/test_jobs.py keeps the two equal).
QUEUE_NAME: Final = "arq:queue"
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
