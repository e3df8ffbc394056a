"""The semantic answer cache: a question that has the same answer as one already
answered for the same course reuses that answer, as long as the chunks it was
built from are still there.

"The same answer" is decided by checks, not by cosine similarity alone (which
cannot tell "upload" from "download"): a candidate close enough in embedding must
agree on every slot (:func:`same_slots`: the kind of answer asked for, opposite
poles, negation, units, numbers, terms and names, roles, words swapped in place)
and must have retrieved nearly the same chunks (:func:`evidence_agrees`). Both
questions are compared in canonical form, and a follow-up by its standalone
rewrite (``rag/answering/rewrite.py``). The threshold and the checks come from a
measurement on two labelled sets (``bench/semantic_threshold.py``,
docs/decisions.md). With a chat model, a candidate that passes every check but
is less similar than ``SEMANTIC_CACHE_VERIFY_BELOW`` is served only if the model
answers "yes" to "do these two questions have the same answer?"
(:func:`verify_same_answer`): one call of :data:`VERIFY_MAX_TOKENS` tokens at
most per question, bounded by ``SEMANTIC_CACHE_VERIFY_TIMEOUT``; no verdict (an
error, a timeout, another reply) is a miss, never a hit.

Scope: ``course_id`` and the embedding model are part of every lookup, so no
answer ever crosses courses. Each entry records its *evidence*, the ids of the
chunks in its prompt; a reindex or an import that deletes or replaces chunks
evicts exactly the entries built from them (:func:`evict`), and one built from
no chunk goes with any change. An unchanged topic keeps its cached answers. Only
answers whose prompts held no learner's history are stored (a session's first
turn, unless ``SEMANTIC_CACHE_ALL_TURNS``); follow-ups look them up by their
rewrite.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import numpy as np

from rag.answering.search import configure_search
from rag.content.embeddings import normalize_text
from rag.platform import metrics
from rag.platform.db import Conn, Database, fetch_all
from rag.platform.errors import ProviderError
from rag.providers.base import ChatMessage, Provider

log = logging.getLogger("rag.answering.semantic_cache")

#: Words that flip a question's meaning while barely moving its embedding, as pairs
#: of opposite poles ("add salt before / after the autolyse", "large / small holes",
#: "upload / download"). Two questions conflict when one uses only words of one pole
#: and the other only words of the opposite pole; a word the other question leaves
#: out is no conflict ("why does bread go stale" / "... stale so quickly"), nor are
#: two words of one pole ("faster" / "more quickly"). Negation is stricter: both or
#: neither. Grown from the false hits of the labelled set with both embedders
#: (bench/semantic_threshold.py): a guard the measurement showed necessary, not a
#: proof of safety.
_POLES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("before", "earlier", "early", "sooner", "first"), ("after", "later", "late", "last")),
    (
        ("above", "over", "more", "most", "many"),
        ("below", "under", "less", "fewer", "least", "few"),
    ),
    (("up",), ("down",)),
    (("on",), ("off",)),
    (("large", "big", "bigger", "larger"), ("small", "little", "smaller")),
    (("high", "higher"), ("low", "lower")),
    (("fast", "faster", "quick", "quickly"), ("slow", "slower", "slowly")),
    (("long", "longer"), ("short", "shorter")),
    (("hot", "warm", "warmer", "hotter"), ("cold", "cool", "cooler", "colder")),
    (("dark", "darker"), ("pale", "light", "lighter")),
    (("thick",), ("thin",)),
    (("wet",), ("dry",)),
    (("soft", "chewy"), ("hard", "firm", "crispy")),
    (("loose",), ("tight",)),
    (("open",), ("closed",)),
    (("dense",), ("airy",)),
    (
        ("increase", "increasing", "increased", "raise", "raising"),
        ("decrease", "decreasing", "decreased", "reduce", "reducing", "lower", "lowering", "cut"),
    ),
    (("add", "put"), ("remove", "take")),
    (("upload", "uploads", "uploading"), ("download", "downloads", "downloading")),
    (("server", "servers"), ("client", "clients")),
    (("send", "sends", "sending"), ("receive", "receives", "receiving")),
    (("import",), ("export",)),
    (("input",), ("output",)),
    (("minimum", "min"), ("maximum", "max")),
    (("overproofed", "overproof"), ("underproofed", "underproof")),
    (("sour",), ("sweet",)),
    (("wide", "wider"), ("narrow", "narrower")),
    (("strong", "stronger"), ("weak", "weaker")),
    (("inbound", "incoming"), ("outbound", "outgoing")),
    (("source",), ("destination",)),
    (("top",), ("bottom",)),
    (("inside", "internal"), ("outside", "external")),
    (("public",), ("private",)),
    (("upstream",), ("downstream",)),
    (("front",), ("back",)),
    (("left",), ("right",)),
    (("start",), ("end",)),
)
GUARD_GROUPS: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (frozenset(a), frozenset(b)) for a, b in _POLES
)
#: Spans and units: two questions naming different ones conflict ("store bread for a
#: day / a month", "a teaspoon / a tablespoon of salt").
UNIT_GROUPS: tuple[frozenset[str], ...] = tuple(
    frozenset(group)
    for group in (
        (
            *("second", "seconds", "minute", "minutes", "hour", "hours", "day", "days"),
            *("week", "weeks", "month", "months", "year", "years", "overnight", "night"),
        ),
        ("teaspoon", "tablespoon", "cup", "cups", "gram", "grams", "ounce", "ounces"),
    )
)
#: Negation: both questions use it, or neither.
NEGATION_WORDS = frozenset(["not", "no", "nor", "never", "without"])
GUARD_WORDS = frozenset().union(*(a | b for a, b in GUARD_GROUPS), *UNIT_GROUPS) | NEGATION_WORDS
_NEGATIONS = re.compile(
    r"^(?:dont|doesnt|didnt|isnt|arent|wasnt|cant|cannot|wont|shouldnt|unable)$"
)
_GUARD_TOKEN = re.compile(r"[^\W_]+")


def guard_words(question: str) -> frozenset[str]:
    """The :data:`GUARD_WORDS` of a question ("don't", "can't"... count as "not")."""
    return frozenset(guard_sequence(question))


def guard_sequence(question: str) -> tuple[str, ...]:
    """The question's guard words in the order it uses them ("adding" counts as "add",
    "removed" as "remove")."""
    text = normalize_text(question).casefold().replace("'", "").replace("\u2019", "")
    words = ("not" if _NEGATIONS.match(w) else w for w in _GUARD_TOKEN.findall(text))
    found = (_guard_form(w) for w in words)
    return tuple(w for w in found if w is not None)


def _guard_form(word: str) -> str | None:
    """``word`` or the guard word it inflects, None for no guard word."""
    if word in GUARD_WORDS:
        return word
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)]
            for form in (stem, stem + "e", stem[:-1] if stem[-1:] == stem[-2:-1] else stem):
                if form in GUARD_WORDS:
                    return form
    return None


_STOPWORDS = frozenset(
    [
        *("a", "an", "the", "i", "my", "me", "we", "you", "your", "it", "its", "is", "are"),
        *("was", "be", "do", "does", "did", "can", "could", "should", "would", "how", "what"),
        *("why", "when", "where", "which", "who", "whom", "of", "in", "on", "at", "for", "by"),
        *("with", "and", "or", "if", "so", "this", "that", "there", "their", "they", "them"),
        *("please", "tell", "explain"),
    ]
)
#: A number not inside a word (WPA2, Cat6 and IPv6 are terms), with its unit if it has one.
_NUMBER = re.compile(
    r"(?<![\w.])\d+(?:[.,/:]\d+)*(?:\s*(?:%|°\s*[cf]\b|(?:[kmgt]?(?:bps|b/s|hz|b|w)|ms|s|m|km|cm|"
    r"mm|g|kg|ml|l|v|h|min|mins|hrs?|percent|degrees?|gb|mb|kb|tb|ghz|mhz|gbps|mbps|kbps)\b))?",
    re.IGNORECASE,
)
_NUMBER_WORDS = frozenset(
    [
        *("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
        *("eleven", "twelve", "twenty", "hundred", "thousand", "half", "twice", "double"),
    ]
)
_QUOTED = re.compile(r"[\"“”']([^\"“”']{2,})[\"“”']")
_TERM = re.compile(r"\b(?=[\w.+/-]*[A-Za-z])(?=\w*(?:\d|[A-Z]\w*[A-Z]))[\w.+/-]+")


class QuestionSlots(msgspec.Struct, frozen=True):
    """What must be equal between two questions for one answer to serve both, beyond
    a close embedding: what kind of answer is asked for, words that flip meaning,
    numbers with their units, acronyms and model names, names, quoted terms, and the
    order of the words the two questions share."""

    intent: str
    #: Guard words in the order the question uses them.
    guards: tuple[str, ...]
    numbers: tuple[str, ...]
    terms: frozenset[str]
    names: frozenset[str]
    quoted: frozenset[str]
    #: Content words in order of first use.
    ordered: tuple[str, ...]
    #: "the difference between A and B", "A vs B": the order of A and B is free.
    symmetric: bool
    #: The question case-folded, to find the other question's terms in it.
    folded: str


#: The kind of answer a question asks for, from its opening words, first match wins:
#: "why" and "how come" want a reason, "how do I" a procedure, "how long" a duration,
#: "should I" and "can I" a yes or no; "what is", "what does" and a bare phrase
#: ("bulk fermentation?") an explanation. Coarse on purpose: checked against the 495
#: labelled pairs, "What is a starter?" / "How do I make a starter?" and "Why does
#: bread go stale?" / "How do I keep bread from going stale?" share topic, evidence
#: and most words and need different answers, while finer kinds only refused
#: paraphrases ("What does X change?" / "How does X affect ...?").
_INTENTS = (
    ("explain", r"what happens|what will happen|what would happen"),
    ("reason", r"why|how come|what(?:'s| is) the (?:reason|point|purpose)|what (?:causes|makes)"),
    ("duration", r"how long|for how long|how many (?:hours|minutes|days)"),
    ("frequency", r"how often"),
    ("quantity", r"how (?:much|many)|what (?:amount|proportion|percentage)"),
    (
        "degree",
        r"how (?:hot|cold|warm|big|large|small|fast|far|high|low|strong)|"
        r"(?:at )?what (?:temperature|speed|size)",
    ),
    ("time", r"when|at what point|what time"),
    ("place", r"where"),
    ("choice", r"which|what (?:kind|type|sort)"),
    (
        "procedure",
        r"how (?:do|can|should|would|could|to) (?:i|you|we|one)\b|how to|"
        r"what(?:'s| is) the best way|what(?:'s| is) a (?:quick |good |simple )?way|"
        r"what can i do|what should i do|is there a way",
    ),
    (
        "yes-no",
        r"should|do i need|is it|can i|must i|would it|do|does|did|is|are|was|were|"
        r"can|could|will|has|have",
    ),
)
_INTENT_PATTERNS = tuple((name, re.compile(rf"^(?:{pattern})\b")) for name, pattern in _INTENTS)
_SYMMETRIC = re.compile(r"\b(?:difference between|differ|compare|compared|versus|vs)\b")
_NAME = re.compile(r"(?<=[\w,;:] )[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:-[A-Za-z]+)*\b")


_WH = re.compile(r"^(?:what|who|whom|whose)\b")


def question_intent(question: str) -> str:
    """The kind of answer asked for (see :data:`_INTENTS`); "explain" for the rest. An
    opening clause ("When a lease expires, what happens?", "In a starter, do the
    yeasts ...?") is skipped when what follows its comma or colon names a kind."""
    folded = normalize_text(question).casefold().replace("\u2019", "'")
    folded = re.sub(r"^whats\b", "what's", folded)
    folded = re.sub(r"^(?:and|so|but|also|ok|okay|then)\b[\s,]*", "", folded)
    for sep in (",", ":"):
        if sep in folded:
            tail = folded.split(sep, 1)[1].strip()
            found = _match_intent(tail)
            if found is None and _WH.match(tail):
                found = "explain"  # "..., what should I check first?"
            if found is not None:
                return found
    return _match_intent(folded) or "explain"


def _match_intent(text: str) -> str | None:
    for name, pattern in _INTENT_PATTERNS:
        if pattern.match(text):
            return name
    return None


def question_slots(question: str) -> QuestionSlots:
    text = normalize_text(question)
    folded = text.casefold().replace("'", "").replace("\u2019", "")
    words = [w for w in _GUARD_TOKEN.findall(folded)]
    numbers = tuple(
        sorted(
            [re.sub(r"\s+", "", n).casefold() for n in _NUMBER.findall(text)]
            + [w for w in words if w in _NUMBER_WORDS]
        )
    )
    # A question typed in capitals has no acronyms or names to tell apart.
    letters = [c for c in text if c.isalpha()]
    shouting = bool(letters) and sum(c.isupper() for c in letters) > 0.6 * len(letters)
    terms = frozenset() if shouting else frozenset(t.casefold() for t in _TERM.findall(text))
    names = frozenset() if shouting else frozenset(n.casefold() for n in _NAME.findall(text))
    quoted = frozenset(q.strip().casefold() for q in _QUOTED.findall(text))
    # Direction words stay in: "from the crumb to the crust" and "from the crust to
    # the crumb" swap the two around the "to" they share.
    # Plurals fold ("gliadins" / "gliadin"), so a swap of the two is still seen.
    seen: dict[str, None] = {}
    for word in words:
        if word not in _STOPWORDS:
            seen.setdefault(_singular(word), None)
    return QuestionSlots(
        intent=question_intent(text),
        guards=guard_sequence(question),
        numbers=numbers,
        terms=terms,
        names=names - terms,
        quoted=quoted,
        ordered=tuple(seen),
        symmetric=bool(_SYMMETRIC.search(folded)),
        folded=" ".join(_TERM_WORD.findall(text.casefold())),
    )


_TERM_WORD = re.compile(r"[\w.+/-]+")


def _terms_in(a: QuestionSlots, b: QuestionSlots) -> bool:
    """Whether every term of ``a`` is a word of ``b``, hyphens aside ("Wi-Fi" is
    "wifi", and holds "wi")."""
    words: set[str] = set()
    for token in b.folded.split():
        words |= {token, token.replace("-", ""), *token.split("-")}
    return all(term in words or term.replace("-", "") in words for term in a.terms | a.names)


def guards_conflict(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two questions' guard words (in the order they use them) flip the meaning
    (see :data:`GUARD_GROUPS`): for each pair of poles both use, the order of the
    poles they name must be the same ("more water ... more open" / "less water ...
    more open" differ; "faster" / "more quickly" do not)."""
    if (set(a) & NEGATION_WORDS) != (set(b) & NEGATION_WORDS):
        return True
    for one, other in GUARD_GROUPS:
        poles_a = [w in one for w in a if w in one or w in other]
        poles_b = [w in one for w in b if w in one or w in other]
        if poles_a and poles_b and _collapse(poles_a) != _collapse(poles_b):
            return True
    for group in UNIT_GROUPS:
        in_a, in_b = set(a) & group, set(b) & group
        if in_a and in_b and in_a != in_b:
            return True
    return False


def _collapse(poles: list[bool]) -> list[bool]:
    """Repeats of one pole in a row count once ("faster, more quickly")."""
    return [p for i, p in enumerate(poles) if i == 0 or poles[i - 1] != p]


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _substituted(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether the two questions are the same words but for one place where one to
    three words stand for one to three others ("cake / bread flour for a sandwich loaf",
    "in summer / in winter", "a drop / a reject rule", "in a stand mixer / by hand"):
    such a pair asks about a sibling thing, not the same one in other words. A
    misspelling ("kneed" / "knead") is no swap, nor is a word added ("usually"); a
    paraphrase rewords more than that. Stopwords are not compared."""
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    x, y = a[start : len(a) - end], b[start : len(b) - end]
    if not x or not y or len(x) > 3 or len(y) > 3 or start + end < 1:
        return False
    if sorted(x) == sorted(y):
        return False  # the same words in another order: a reorder, or a role swap
    if "".join(x) == "".join(y):
        return False  # "window-pane" / "windowpane", "over-proofed" / "overproofed"
    return not (len(x) == len(y) == 1 and _misspelt(x[0], y[0]))


def _misspelt(x: str, y: str) -> bool:
    """One edit apart, or two in a long word ("temperture"; "lactic" / "acetic" are
    two edits in six letters: two words)."""
    edits = _edits(x, y)
    return edits <= 1 or (edits == 2 and min(len(x), len(y)) >= 8)


def _edits(x: str, y: str) -> int:
    """Edit distance with transpositions (optimal string alignment): "hihg" is one
    edit from "high", as a typist makes it."""
    rows = [list(range(len(y) + 1))]
    for i in range(1, len(x) + 1):
        row = [i]
        for j in range(1, len(y) + 1):
            cost = x[i - 1] != y[j - 1]
            best = min(rows[i - 1][j] + 1, row[j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and x[i - 1] == y[j - 2] and x[i - 2] == y[j - 1]:
                best = min(best, rows[i - 2][j - 2] + 1)
            row.append(best)
        rows.append(row)
    return rows[-1][-1]


def _swapped_around(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two shared words trade places around words that stay between them in
    both questions ("do the yeasts ... outnumber the bacteria" / "do the bacteria ...
    outnumber the yeasts"), which swaps roles. Moving a whole clause ("for a crispy
    crust, should I use steam" / "should I use steam for a crispy crust") leaves no
    shared word between a swapped pair in both, and is allowed."""
    shared = set(a) & set(b)
    pa = {w: i for i, w in enumerate(w for w in a if w in shared)}
    pb = {w: i for i, w in enumerate(w for w in b if w in shared)}
    words = list(pa)
    for i, x in enumerate(words):
        for y in words[i + 1 :]:
            if (pa[x] < pa[y]) == (pb[x] < pb[y]):
                continue
            lo_a, hi_a = sorted((pa[x], pa[y]))
            lo_b, hi_b = sorted((pb[x], pb[y]))
            between_a = {w for w in words if lo_a < pa[w] < hi_a}
            between_b = {w for w in words if lo_b < pb[w] < hi_b}
            if between_a & between_b:
                return True
    return False


def same_slots(a: QuestionSlots, b: QuestionSlots) -> bool:
    """Whether two questions agree on every slot (see :class:`QuestionSlots`)."""
    if a.intent != b.intent:
        return False
    if guards_conflict(a.guards, b.guards):
        return False
    if (a.numbers, a.quoted) != (b.numbers, b.quoted):
        return False
    if not _terms_in(a, b) or not _terms_in(b, a):
        # Each question's terms and names must be words of the other: "802.11k" /
        # "802.11r", "WPA2" / "WPA3" and "on a Mac" / "on Windows" differ, "QoS" /
        # "qos" do not (a term is only recognized by its capitals or digits).
        return False
    if _substituted(a.ordered, b.ordered):
        return False
    if a.symmetric and b.symmetric:
        return True
    return not _swapped_around(a.ordered, b.ordered)


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
 WHERE course_id = %(course_id)s AND embedding_model = %(model)s AND gate = %(gate)s
   AND flagged_at IS NULL
 ORDER BY embedding <=> %(query)s
 LIMIT 3
"""

INSERT_SQL = """
INSERT INTO semantic_cache (course_id, content_version, gate, question, question_hash,
                            embedding_model, embedding, answer, citations, usage, evidence,
                            retrieved, job_id)
VALUES (%(course_id)s, %(version)s, %(gate)s, %(question)s, %(hash)s, %(model)s,
        %(embedding)s, %(answer)s, %(citations)s, %(usage)s, %(evidence)s, %(retrieved)s,
        %(job_id)s)
ON CONFLICT (course_id, content_version, gate, question_hash) DO NOTHING
"""


class Scope(msgspec.Struct, frozen=True):
    """Where a cached answer may be served: one course, one embedder, one gate (the
    modules its question could see: '' for all of them, ``rag/learners/progress.py``).
    ``version`` is the content version it was built on (kept for the record, and in
    single-flight keys)."""

    course_id: int
    version: int
    model: str
    gate: str = ""


class CachedAnswer(msgspec.Struct, frozen=True):
    id: int
    question: str
    answer: str
    citations: Any
    retrieved: list[int]
    similarity: float
    #: The chat model said yes to serving it (a candidate below SEMANTIC_CACHE_VERIFY_BELOW).
    verified: bool = False


def question_hash(question: str) -> str:
    """Hash of the normalized, case-folded question (exact repeats share a row)."""
    return hashlib.sha256(normalize_text(question).casefold().encode()).hexdigest()


#: Asks whether a cached question has the new one's answer: True, False, or None
#: for no verdict (:func:`verify_same_answer` bound to a provider and a time limit).
Verifier = Callable[[str], Awaitable[bool | None]]


def _first_servable(
    candidates: Sequence[CachedAnswer],
    slots: QuestionSlots,
    retrieved: Sequence[int],
    threshold: float,
    evidence_shared: int,
) -> tuple[CachedAnswer | None, str]:
    """The nearest candidate every check passes, or None and the check that refused
    the nearest one close enough (``threshold`` when none was close enough)."""
    reason = "threshold"
    for c in candidates:
        if c.similarity < threshold:
            continue
        refused_by = (
            "slots"
            if not same_slots(question_slots(c.question), slots)
            else "evidence"
            if not evidence_agrees(retrieved, c.retrieved, evidence_shared)
            else None
        )
        if refused_by is None:
            return c, ""
        if reason == "threshold":  # the nearest refusal is the one reported
            reason = refused_by
    return None, reason


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
    verify: Verifier | None = None,
    verify_below: float = 1.0,
) -> CachedAnswer | None:
    """The nearest cached answer whose question is at least ``threshold`` similar,
    agrees with ``question`` on every slot (:func:`same_slots`) and retrieved nearly
    the same chunks as ``retrieved`` did (:func:`evidence_agrees`); below
    ``verify_below`` it must also get ``verify``'s yes (``verified`` says it did).
    The verifier is asked once at most, outside the database transaction."""
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
                "gate": scope.gate,
            },
        )
        hit, reason = _first_servable(candidates, slots, retrieved, threshold, evidence_shared)
        if hit is None:
            result = "miss" if reason == "threshold" else "refused"
            metrics.CACHE_LOOKUPS.labels(result, reason).inc()
            return None
        if verify is None or hit.similarity >= verify_below:
            # No model call: the hit is counted in the lookup's own transaction.
            await _count_hit(conn, hit.id)
            metrics.CACHE_LOOKUPS.labels("hit", "").inc()
            return hit
    # The grey zone: the verifier is asked once, with no connection held while it runs
    # (the next candidate is further still, and is not asked).
    if await verify(hit.question) is not True:
        metrics.CACHE_LOOKUPS.labels("refused", "verifier").inc()
        return None
    async with db.connection() as conn:
        await _count_hit(conn, hit.id)
    metrics.CACHE_LOOKUPS.labels("hit", "verified").inc()
    return msgspec.structs.replace(hit, verified=True)


#: The verifier's instructions; the fake OpenAI server recognizes the first line.
VERIFY_RULES = """You decide whether two questions asked in one course have the same answer.
Reply yes only if one correct answer to the first question is a complete and \
correct answer to the second: same subject, same direction, same numbers, same \
scope, same kind of answer asked for. Reply no if anything differs that would \
change the answer. Reply with one word: yes or no."""
VERIFY_MAX_TOKENS = 2


def verify_messages(cached: str, new: str) -> list[ChatMessage]:
    """The chat messages of one verification."""
    return [
        ChatMessage(role="system", content=VERIFY_RULES),
        ChatMessage(
            role="user",
            content=f"First question: {' '.join(cached.split())}\n"
            f"Second question: {' '.join(new.split())}",
        ),
    ]


async def verify_same_answer(
    provider: Provider, cached: str, new: str, *, time_limit: float
) -> bool | None:
    """The chat model's verdict on whether ``cached``'s answer answers ``new``: True or
    False, or None when it gave none (an error, a timeout, a reply that is neither)."""
    messages = verify_messages(cached, new)
    try:
        reply = await provider.short_reply(
            messages, max_tokens=VERIFY_MAX_TOKENS, time_limit=time_limit
        )
    except (ProviderError, TimeoutError) as exc:
        log.warning("semantic cache verification failed, treated as a miss: %s", exc)
        return None
    verdict = reply.strip().strip(".!").casefold()
    return {"yes": True, "no": False}.get(verdict)


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
    job_id: uuid.UUID | None = None,
) -> None:
    """Cache an answer with its evidence (the ids of the chunks its prompt held, for
    eviction), what its question retrieved, best first (for the evidence check), and
    the job that generated it (a thumbs-down on that job takes it out of service)."""
    enc = msgspec.json.encode
    await db.execute(
        INSERT_SQL,
        {
            "course_id": scope.course_id,
            "version": scope.version,
            "gate": scope.gate,
            "question": question,
            "hash": question_hash(question),
            "model": scope.model,
            "embedding": np.asarray(embedding, dtype=np.float32),
            "answer": answer,
            "citations": enc(citations).decode(),
            "usage": enc(usage).decode(),
            "evidence": sorted(set(evidence)),
            "retrieved": list(retrieved),
            "job_id": job_id,
        },
    )


EVICT_SQL = """
DELETE FROM semantic_cache
 WHERE course_id = %(course_id)s AND (evidence && %(chunks)s::bigint[] OR evidence = '{}')
"""


FLAG_SQL = """
UPDATE semantic_cache SET flagged_at = now()
 WHERE course_id = %(course_id)s AND flagged_at IS NULL
   AND (id = %(entry_id)s OR job_id = %(job_id)s)
"""


async def flag(conn: Conn, course_id: int, job_id: uuid.UUID, entry_id: int | None) -> int:
    """Take out of service the entry a job was served from (``entry_id``) and the one
    its own answer went into; kept, flagged, for an instructor to review. The number
    flagged."""
    cur = await conn.execute(
        FLAG_SQL, {"course_id": course_id, "entry_id": entry_id, "job_id": job_id}
    )
    return cur.rowcount


async def evict(conn: Conn, course_id: int, chunk_ids: list[int]) -> int:
    """Drop the course's cached answers built from any of ``chunk_ids`` (deleted or
    replaced by a reindex or an import), and those built from no chunk at all (new
    content may now cover them); in the caller's transaction. The number dropped."""
    cur = await conn.execute(EVICT_SQL, {"course_id": course_id, "chunks": chunk_ids})
    return cur.rowcount
