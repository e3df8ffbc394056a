"""The semantic answer cache: a standalone question close enough to one already
answered for the same course *and the same content version* reuses that answer.

Scope: ``course_id`` and ``content_version`` are part of every lookup, so a
reindex that changes content (and bumps the version) retires every cached
answer of that course at once, and no answer ever crosses courses. Only
standalone questions use it (the first turn of a session, unless a setting
widens that): a follow-up like "and how long?" means something else in every
conversation. The threshold comes from a measurement on a labelled set of
paraphrases and near-misses (``bench/semantic_threshold.py``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec
import numpy as np

from rag.db import Conn, Database, fetch_all
from rag.embeddings import normalize_text
from rag.search import configure_search

#: Words that flip a question's meaning while barely moving its embedding
#: ("add salt before / after the autolyse", "do not knead"; the offline embedder
#: drops them as stopwords, and real embedders weigh them lightly): a cached
#: answer is only reused when both questions use the same set of them. Chosen
#: from the labelled set's false hits (bench/semantic_threshold.py), so treat it
#: as a guard that the measurement showed necessary, not as proof of safety.
GUARD_WORDS = frozenset(
    [
        "not",
        "no",
        "nor",
        "never",
        "without",
        "before",
        "after",
        "above",
        "below",
        "over",
        "under",
        "more",
        "less",
        "most",
        "least",
        "few",
        "up",
        "down",
        "off",
        "on",
        "out",
        "only",
        "too",
        "very",
        "again",
    ]
)
_NEGATIONS = re.compile(r"^(?:dont|doesnt|didnt|isnt|arent|wasnt|cant|cannot|wont|shouldnt)$")
_GUARD_TOKEN = re.compile(r"[^\W_]+")


def guard_words(question: str) -> frozenset[str]:
    """The :data:`GUARD_WORDS` of a question ("don't", "can't"... count as "not")."""
    text = normalize_text(question).casefold().replace("'", "").replace("\u2019", "")
    words = {"not" if _NEGATIONS.match(w) else w for w in _GUARD_TOKEN.findall(text)}
    return frozenset(words & GUARD_WORDS)


LOOKUP_SQL = """
SELECT id, question, answer, citations, 1 - (embedding <=> %(query)s) AS similarity
  FROM semantic_cache
 WHERE course_id = %(course_id)s AND content_version = %(version)s
   AND embedding_model = %(model)s
 ORDER BY embedding <=> %(query)s
 LIMIT 3
"""

INSERT_SQL = """
INSERT INTO semantic_cache (course_id, content_version, question, question_hash,
                            embedding_model, embedding, answer, citations, usage)
VALUES (%(course_id)s, %(version)s, %(question)s, %(hash)s, %(model)s, %(embedding)s,
        %(answer)s, %(citations)s, %(usage)s)
ON CONFLICT (course_id, content_version, question_hash) DO NOTHING
"""


class Scope(msgspec.Struct, frozen=True):
    """What a cached answer is valid for: one course, one content version, one embedder."""

    course_id: int
    version: int
    model: str


class CachedAnswer(msgspec.Struct, frozen=True):
    id: int
    question: str
    answer: str
    citations: Any
    similarity: float


def question_hash(question: str) -> str:
    """Hash of the normalized, case-folded question (exact repeats share a row)."""
    return hashlib.sha256(normalize_text(question).casefold().encode()).hexdigest()


async def lookup(
    db: Database,
    scope: Scope,
    *,
    question: str,
    embedding: np.ndarray,
    threshold: float,
    ef_search: int,
) -> CachedAnswer | None:
    """The nearest cached answer whose question is at least ``threshold`` similar and
    uses the same :data:`GUARD_WORDS` as ``question``."""
    guard = guard_words(question)
    async with db.transaction() as conn:
        await configure_search(conn, ef_search)
        candidates = await fetch_all(
            conn,
            CachedAnswer,
            LOOKUP_SQL,
            {
                "query": np.asarray(embedding, dtype=np.float32),
                "course_id": scope.course_id,
                "version": scope.version,
                "model": scope.model,
            },
        )
        for hit in candidates:
            if hit.similarity >= threshold and guard_words(hit.question) == guard:
                await _count_hit(conn, hit.id)
                return hit
        return None


async def _count_hit(conn: Conn, entry_id: int) -> None:
    await conn.execute(
        "UPDATE semantic_cache SET hits = hits + 1, last_hit_at = now() WHERE id = %s",
        (entry_id,),
    )


async def store(
    db: Database,
    scope: Scope,
    *,
    question: str,
    embedding: np.ndarray,
    answer: str,
    citations: Any,
    usage: Any,
) -> None:
    enc = msgspec.json.encode
    await db.execute(
        INSERT_SQL,
        {
            "course_id": scope.course_id,
            "version": scope.version,
            "question": question,
            "hash": question_hash(question),
            "model": scope.model,
            "embedding": np.asarray(embedding, dtype=np.float32),
            "answer": answer,
            "citations": enc(citations).decode(),
            "usage": enc(usage).decode(),
        },
    )
