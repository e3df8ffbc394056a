"""The queue contract between the API and the workers, in one place (as arq keeps its
own prefixes in ``arq/constants.py``): the queue both sides use and the names of the
jobs on it. The API enqueues on it, ``api/limits.py`` reads its depth, the worker
consumes it and the reconciler re-enqueues on it."""

from __future__ import annotations

from typing import Final

from arq.constants import default_queue_name

#: The arq queue (a Redis sorted set) of every job.
QUEUE_NAME: Final = default_queue_name
#: Job functions, by the name the worker registers them under.
ANSWER_QUESTION: Final = "answer_question"
REINDEX_COURSE: Final = "reindex_course"
UPDATE_CHAT_SUMMARY: Final = "update_chat_summary"
