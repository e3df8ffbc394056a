"""The semantic answer cache: a standalone question close enough to one already
answered for the same course reuses that answer, as long as the chunks it was
built from are still there.

Scope: ``course_id`` and the embedding model are part of every lookup, so no
answer ever crosses courses. Each entry records its *evidence*, the ids of the
chunks in its prompt; a reindex or an import that deletes or replaces chunks
evicts exactly the entries built from them (:func:`evict`), and one built from
no chunk goes with any change. An unchanged topic keeps its cached answers. Only
standalone questions use it (the first turn of a session, unless a setting
widens that): a follow-up like "and how long?" means something else in every
conversation. The threshold comes from a measurement on a labelled set of
paraphrases and near-misses (``bench/semantic_threshold.py``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
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
        # Opposites that real embedders place within a paraphrase's distance of each
        # other (bench/semantic_threshold.py --embedder local: "large / small holes"
        # 0.981, "rise too fast / too slowly" 0.969, "more / less water" 0.982).
        *("large", "small", "big", "little", "high", "low", "higher", "lower"),
        *("fast", "slow", "faster", "slower", "quick", "quickly", "slowly"),
        *("longer", "shorter", "hot", "cold", "warm", "cool"),
        *("warmer", "cooler", "dark", "pale", "light", "thick", "thin", "wet", "dry"),
        *("soft", "hard", "firm", "loose", "tight", "open", "closed", "dense", "airy"),
        *("early", "late", "first", "last", "increase", "decrease"),
        *("upload", "download", "server", "client", "send", "receive", "import", "export"),
        *("input", "output", "minimum", "maximum", "min", "max", "overproofed"),
        *("underproofed", "overproof", "underproof", "crispy", "chewy", "sour", "sweet"),
    ]
)
_NEGATIONS = re.compile(r"^(?:dont|doesnt|didnt|isnt|arent|wasnt|cant|cannot|wont|shouldnt)$")
_GUARD_TOKEN = re.compile(r"[^\W_]+")


def guard_words(question: str) -> frozenset[str]:
    """The :data:`GUARD_WORDS` of a question ("don't", "can't"... count as "not")."""
    text = normalize_text(question).casefold().replace("'", "").replace("\u2019", "")
    words = {"not" if _NEGATIONS.match(w) else w for w in _GUARD_TOKEN.findall(text)}
    return frozenset(words & GUARD_WORDS)


#: Words that make the order of what surrounds them matter ("convert active dry
#: yeast to instant yeast" is not "convert instant yeast to active dry yeast").
_DIRECTION_MARKERS = frozenset(["to", "from", "into", "than", "vs", "versus", "onto", "toward"])
_STOPWORDS = frozenset(
    [
        *("a", "an", "the", "i", "my", "me", "we", "you", "your", "it", "its", "is", "are"),
        *("was", "be", "do", "does", "did", "can", "could", "should", "would", "how", "what"),
        *("why", "when", "where", "which", "who", "whom", "of", "in", "on", "at", "for", "by"),
        *("with", "and", "or", "if", "so", "this", "that", "there", "their", "they", "them"),
        *("please", "tell", "explain"),
    ]
)
_NUMBER = re.compile(r"\d+(?:[.,/:]\d+)*\s*(?:%|°\s*[cf]\b|[a-z]{1,6}\b)?", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“”']([^\"“”']{2,})[\"“”']")
_TERM = re.compile(r"\b(?=[\w.+/-]*[A-Za-z])(?=\w*(?:\d|[A-Z]\w*[A-Z]))[\w.+/-]+")


class QuestionSlots(msgspec.Struct, frozen=True):
    """What must be equal between two questions for one answer to serve both, beyond
    a close embedding: words that flip meaning, numbers with their units, acronyms and
    model names, quoted terms, and the order around a direction word."""

    guards: frozenset[str]
    numbers: tuple[str, ...]
    terms: frozenset[str]
    quoted: frozenset[str]
    #: Content words in order, for a question with a direction word (None otherwise).
    ordered: tuple[str, ...] | None


def question_slots(question: str) -> QuestionSlots:
    text = normalize_text(question)
    folded = text.casefold().replace("'", "").replace("\u2019", "")
    words = [w for w in _GUARD_TOKEN.findall(folded)]
    numbers = tuple(sorted(re.sub(r"\s+", "", n).casefold() for n in _NUMBER.findall(text)))
    # A question typed in capitals has no acronyms to tell apart.
    letters = [c for c in text if c.isalpha()]
    shouting = bool(letters) and sum(c.isupper() for c in letters) > 0.6 * len(letters)
    terms = frozenset() if shouting else frozenset(t.casefold() for t in _TERM.findall(text))
    quoted = frozenset(q.strip().casefold() for q in _QUOTED.findall(text))
    ordered = None
    if _DIRECTION_MARKERS & set(words):
        seen: dict[str, None] = {}
        for word in words:
            if word not in _STOPWORDS and word not in _DIRECTION_MARKERS:
                seen.setdefault(word, None)
        ordered = tuple(seen)
    return QuestionSlots(guard_words(question), numbers, terms, quoted, ordered)


def same_slots(a: QuestionSlots, b: QuestionSlots) -> bool:
    """Whether two questions agree on every slot (see :class:`QuestionSlots`). The order
    check compares only the content words both share, so "how long to knead" still
    matches "how long should I knead"."""
    if (a.guards, a.numbers, a.terms, a.quoted) != (b.guards, b.numbers, b.terms, b.quoted):
        return False
    if a.ordered is None or b.ordered is None:
        return True
    shared = set(a.ordered) & set(b.ordered)
    return [w for w in a.ordered if w in shared] == [w for w in b.ordered if w in shared]


#: How many of each question's best retrieved chunks the evidence check compares.
EVIDENCE_TOP = 3


def evidence_agrees(new: Sequence[int], cached: Sequence[int], shared: int) -> bool:
    """Whether two questions retrieved (nearly) the same chunks: at least ``shared`` of
    the best :data:`EVIDENCE_TOP` chunk ids of each are common to both (fewer when a
    list is shorter). An entry stored without its retrieval (before the check existed)
    never agrees; ``shared`` 0 turns the check off."""
    if shared <= 0:
        return True
    a, b = set(new[:EVIDENCE_TOP]), set(cached[:EVIDENCE_TOP])
    if not a or not b:
        return not a and not b  # a course with no chunks at all: nothing to disagree on
    return len(a & b) >= min(shared, len(a), len(b))


LOOKUP_SQL = """
SELECT id, question, answer, citations, retrieved, 1 - (embedding <=> %(query)s) AS similarity
  FROM semantic_cache
 WHERE course_id = %(course_id)s AND embedding_model = %(model)s
 ORDER BY embedding <=> %(query)s
 LIMIT 3
"""

INSERT_SQL = """
INSERT INTO semantic_cache (course_id, content_version, question, question_hash,
                            embedding_model, embedding, answer, citations, usage, evidence,
                            retrieved)
VALUES (%(course_id)s, %(version)s, %(question)s, %(hash)s, %(model)s, %(embedding)s,
        %(answer)s, %(citations)s, %(usage)s, %(evidence)s, %(retrieved)s)
ON CONFLICT (course_id, content_version, question_hash) DO NOTHING
"""


class Scope(msgspec.Struct, frozen=True):
    """Where a cached answer may be served: one course, one embedder. ``version`` is the
    content version it was built on (kept for the record, and in single-flight keys)."""

    course_id: int
    version: int
    model: str


class CachedAnswer(msgspec.Struct, frozen=True):
    id: int
    question: str
    answer: str
    citations: Any
    retrieved: list[int]
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
    retrieved: Sequence[int],
    threshold: float,
    evidence_shared: int,
    ef_search: int,
) -> CachedAnswer | None:
    """The nearest cached answer whose question is at least ``threshold`` similar,
    agrees with ``question`` on every slot (:func:`same_slots`) and retrieved nearly
    the same chunks as ``retrieved`` did (:func:`evidence_agrees`)."""
    slots = question_slots(question)
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
            if (
                hit.similarity >= threshold
                and same_slots(question_slots(hit.question), slots)
                and evidence_agrees(retrieved, hit.retrieved, evidence_shared)
            ):
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
    evidence: list[int],
    retrieved: Sequence[int],
) -> None:
    """Cache an answer with its evidence (the ids of the chunks its prompt held, for
    eviction) and what its question retrieved, best first (for the evidence check)."""
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
            "evidence": sorted(set(evidence)),
            "retrieved": list(retrieved),
        },
    )


EVICT_SQL = """
DELETE FROM semantic_cache
 WHERE course_id = %(course_id)s AND (evidence && %(chunks)s::bigint[] OR evidence = '{}')
"""


async def evict(conn: Conn, course_id: int, chunk_ids: list[int]) -> int:
    """Drop the course's cached answers built from any of ``chunk_ids`` (deleted or
    replaced by a reindex or an import), and those built from no chunk at all (new
    content may now cover them); in the caller's transaction. The number dropped."""
    cur = await conn.execute(EVICT_SQL, {"course_id": course_id, "chunks": chunk_ids})
    return cur.rowcount
