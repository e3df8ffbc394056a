"""The offline provider: local hashed embeddings and extractive answers, no network.

It is the default when no API key is set, so the whole service (indexing,
retrieval, streamed answers) runs and can be tested without a model. Both
halves are deterministic across calls, processes and machines.

Embeddings are feature-hashed bags of words: NFKC + casefold, word tokens
(letters and digits; apostrophes dropped), a small stopword list removed, light
suffix stemming, then stem unigrams (weight 1.0), stem bigrams (0.5) and the
character 3/4-grams of each stem with boundary markers (together a squared-norm
share of 0.25 per word, so misspellings and morphology still overlap), with
sublinear term frequency ``1 + ln(tf)``. Unigrams and n-grams are hashed with
8-byte blake2b, bigrams by mixing their two unigram hashes (splitmix64); a
feature value v adds its weight to bucket ``(v >> 1) % dimensions`` with the sign
of bit 0. Rows are then L2-normalized.

Answers are extractive: the sentences of the ``<source>`` blocks in the prompt
that best match the learner's question, each quoted with its ``[n]`` marker.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import math
import operator
import re
import unicodedata
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from rag.platform.tokens import count_tokens, truncate_to_tokens
from rag.providers.base import ChatDelta, ChatMessage, Provider, Usage, Vectors

#: Id of the vectors :func:`hashed_embeddings` returns; cached and stored vectors
#: are keyed by it, so bump it whenever the features, weights or hashing change.
EMBEDDING_MODEL_ID = "offline-hash-v1"

OFFLINE_NOTICE = (
    "(Offline provider: an extractive answer quoted from the course, no language model was used.)"
)
NOT_COVERED = (
    "The course material provided does not seem to cover this question. "
    "Try rephrasing it, or ask about a topic the course covers."
)
#: A system message line starting with this puts the answer in hint mode
#: (``rag.answering.prompts.HINT_RULES``): pointers to the sources, never their text.
HINT_MARKER = "Hint mode:"
HINT_OPENING = (
    "This part of the course is for you to work out, so here is a pointer instead of the answer."
)

#: Above this many texts :meth:`OfflineProvider.embed` hashes in a worker thread
#: (64 chunks of 1,500 characters take ~10-20 ms: tolerable on the loop).
_THREAD_TEXTS = 64

_BIGRAM_WEIGHT = 0.5
#: L2 norm of one word's character n-gram block relative to its unigram (1.0):
#: a squared-norm share of 0.25, enough for "temperture" to match "temperature"
#: without letting shared letters outweigh shared words.
_NGRAM_NORM = 0.5

_WORD = re.compile(r"[^\W_]+")
# NFKC leaves typographic apostrophes alone; dropping them keeps "don’t" one token.
_APOSTROPHES = ("\u2019", "\u02bc", "\u2018")


def _ascii_table() -> bytes:
    # ASCII letters lowercased, digits kept, other ASCII bytes become spaces; bytes
    # >= 0x80 (UTF-8 sequences of non-ASCII characters) pass through untouched.
    table = bytearray(range(256))
    for byte in range(128):
        char = chr(byte)
        if char.isalnum():
            table[byte] = ord(char.lower())
        else:
            table[byte] = ord(" ")
    return bytes(table)


_ASCII_TABLE = _ascii_table()

_STOPWORD_LIST = """
    a about above after again all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few
    for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just many me more most much my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such
    than that the their theirs them themselves then there these they this those through
    to too under until up very was we were what when where which while who whom why
    will with would you your yours yourself yourselves
"""
_STOPWORDS = frozenset(_STOPWORD_LIST.split())

# (suffix, replacement), longest first; at most one plural and then one other is stripped.
_PLURALS = (("ies", "y"), ("es", ""), ("s", ""))
_ENDINGS = (("ied", "y"), ("ing", ""), ("ed", ""), ("ly", ""), ("er", ""))
_MIN_STEM = 3

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
#: Bigram hashes keep 48 bits so a row number fits above them in one sortable key.
_BIGRAM_BITS = 48
#: Texts per numpy pass: bounds the dense float64 work matrix (512 x 2000 x 8 B = 8 MB);
#: throughput is flat above ~32 texts anyway.
_SLICE = 512
assert _SLICE < 1 << (64 - _BIGRAM_BITS)

_F64 = npt.NDArray[np.float64]
_U64 = npt.NDArray[np.uint64]
_I64 = npt.NDArray[np.int64]

_K = TypeVar("_K")
_V = TypeVar("_V")


class _Memo(dict[_K, _V]):
    """A dict that computes missing values and, when full, forgets its older half.

    Hits are a plain dict lookup, cheaper than ``lru_cache`` on this hot path
    (hundreds of lookups per text); dropping the oldest half, not everything,
    keeps a working set larger than the limit mostly cached.
    """

    def __init__(self, compute: Callable[[_K], _V], limit: int) -> None:
        super().__init__()
        self._compute = compute
        self._limit = limit

    def __missing__(self, key: _K) -> _V:
        value = self._compute(key)
        if len(self) >= self._limit:
            # Copying the keys is one C call, so no other thread changes the dict meanwhile;
            # pop() tolerates a key another thread dropped first.
            for old in list(islice(self, len(self) // 2)):
                self.pop(old, None)
        self[key] = value
        return value


def _hash64(kind: bytes, text: str) -> int:
    # blake2b, not hash(): Python's str hash is salted per process (PYTHONHASHSEED).
    digest = hashlib.blake2b(kind + text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _feature_value(h: int) -> int:
    # 63 bits: a non-negative int64.
    return h >> 1


def _signed(value: int, weight: float) -> float:
    # A feature's value v lands in bucket (v >> 1) % dimensions with sign given by bit 0.
    return -weight if value & 1 else weight


#: The one feature of a text without content words, so its vector is a unit vector too.
_EMPTY_VALUE = _feature_value(_hash64(b"e\x00", "<empty>"))


def _stem(word: str) -> str:
    """The stem of a normalized word, or "" for a stopword.

    Deliberately crude but consistent: "bake", "baked", "bakes", "baking" and
    "baker" all become "bak"; "class"/"classes" and "gas" keep their final s.
    """
    if word in _STOPWORDS:
        return ""
    for suffix, replacement in _PLURALS:
        if word.endswith(suffix):
            stem = word[: -len(suffix)] + replacement
            if len(stem) >= _MIN_STEM and not (suffix == "s" and stem.endswith(("s", "u"))):
                word = stem
                break
    for suffix, replacement in _ENDINGS:
        if word.endswith(suffix):
            stem = word[: -len(suffix)] + replacement
            if len(stem) >= _MIN_STEM:
                if replacement == "" and suffix != "ly" and _doubled(stem):
                    stem = stem[:-1]  # "stopped" -> "stop", "hotter" -> "hot"
                word = stem
                break
    if len(word) > _MIN_STEM and word.endswith("e"):
        word = word[:-1]
    return word


def _doubled(stem: str) -> bool:
    # "ll" and "ss" stay: "rolled" -> "roll", "pressed" -> "press".
    return stem[-1] == stem[-2] and stem[-1] not in "aeiouls"


@dataclass(frozen=True, slots=True, eq=False)
class _StemFeatures:
    """One stem's features, as bytes: joining thousands of bytes objects and reading the
    result with ``np.frombuffer`` is several times faster than concatenating small arrays.
    Compared by identity: counting objects is cheaper than counting strings."""

    unigram: int
    """The stem's 64-bit hash."""
    unigram_bytes: bytes
    """The same, as a little-endian uint64: bigrams mix two of these."""
    values: bytes
    """Feature values (unigram, then character n-grams), little-endian int64."""
    weights: bytes
    """Signed weights aligned with ``values``, little-endian float64."""
    size: int


def _gram_value(gram: str) -> int:
    return _feature_value(_hash64(b"c\x00", gram))


# Distinct stems share most of their n-grams: hashing each gram once saves most of a miss.
_GRAMS: _Memo[str, int] = _Memo(_gram_value, 1 << 16)


def _stem_features(stem: str) -> _StemFeatures:
    unigram = _hash64(b"w\x00", stem)
    marked = f"<{stem}>"
    grams = [marked[i : i + n] for n in (3, 4) for i in range(len(marked) - n + 1)]
    values = [_feature_value(unigram), *map(_GRAMS.__getitem__, grams)]
    gram_weight = _NGRAM_NORM / math.sqrt(len(grams))
    weights = [_signed(values[0], 1.0), *(_signed(v, gram_weight) for v in values[1:])]
    return _StemFeatures(
        unigram,
        unigram.to_bytes(8, "little"),
        np.array(values, dtype="<i8").tobytes(),
        np.array(weights, dtype="<f8").tobytes(),
        len(values),
    )


_STEMS: _Memo[str, _StemFeatures] = _Memo(_stem_features, 1 << 16)


def _token_features(token: str) -> tuple[_StemFeatures, ...]:
    """Features of the content words in one pre-split token (ASCII already lowercased)."""
    if token.isascii():
        words: list[str] = [token]
    else:
        # The rare non-ASCII token gets the full treatment; the memo makes it a one-off.
        folded = unicodedata.normalize("NFKC", token).casefold()
        for apostrophe in _APOSTROPHES:
            folded = folded.replace(apostrophe, "")
        words = _WORD.findall(folded)
    return tuple(_STEMS[stem] for stem in map(_stem, words) if stem)


_TOKENS: _Memo[str, tuple[_StemFeatures, ...]] = _Memo(_token_features, 1 << 17)


def _tokens(text: str) -> list[str]:
    # A byte-table split instead of a regex (several times faster); what it leaves
    # non-ASCII is re-split, once per distinct token, by _token_features.
    raw = text.encode("utf-8", "surrogatepass").translate(_ASCII_TABLE, b"'")
    return raw.decode("utf-8", "replace").split()


def _stem_sequence(text: str) -> list[_StemFeatures]:
    return list(chain.from_iterable(map(_TOKENS.__getitem__, _tokens(text))))


_UNIGRAM = operator.attrgetter("unigram")
_UNIGRAM_BYTES = operator.attrgetter("unigram_bytes")
_VALUES = operator.attrgetter("values")
_WEIGHTS = operator.attrgetter("weights")
_SIZE = operator.attrgetter("size")


def _mix(left: _U64, right: _U64) -> _U64:
    """splitmix64 of an ordered pair of hashes: stable, and (a, b) != (b, a)."""
    z = (left * _GOLDEN) ^ right
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    result: _U64 = z ^ (z >> np.uint64(31))
    return result


def _distinct(stems: list[_StemFeatures]) -> tuple[list[_StemFeatures], list[int]]:
    """Each distinct stem of a text once, with its count."""
    counts = Counter(stems)
    unique = list(counts)
    if len(set(map(_UNIGRAM, unique))) == len(unique):
        return unique, list(counts.values())
    # Two objects for one stem: a memo was emptied while this text was read. Merge by hash.
    by_hash: dict[int, tuple[_StemFeatures, int]] = {}
    for stem, count in counts.items():
        first, seen = by_hash.get(stem.unigram, (stem, 0))
        by_hash[stem.unigram] = (first, seen + count)
    return [s for s, _ in by_hash.values()], [c for _, c in by_hash.values()]


def hashed_embeddings(texts: Sequence[str], dimensions: int) -> Vectors:
    """Deterministic local embeddings: L2-normalized float32 rows ``(len(texts), dimensions)``.

    A text with no content words (empty, whitespace, only stopwords) gets one
    fixed hashed feature, so every row is a unit vector. Pure CPU, no I/O, thread-safe;
    see the module docstring for the features and :data:`EMBEDDING_MODEL_ID`.
    """
    if dimensions < 1:
        raise ValueError(f"dimensions must be at least 1, got {dimensions}")
    n = len(texts)
    if n > _SLICE:
        return np.concatenate(
            [hashed_embeddings(texts[i : i + _SLICE], dimensions) for i in range(0, n, _SLICE)]
        )
    # Python gathers, per text, each distinct stem's cached features and its count,
    # plus the stem sequence; numpy then weights, buckets and sums the whole batch
    # at once (per-text numpy calls would cost more than the features).
    values: list[bytes] = []
    weights: list[bytes] = []
    sizes: list[int] = []
    tfs: list[int] = []
    distinct: list[int] = []
    sequence: list[bytes] = []
    lengths: list[int] = []
    for text in texts:
        stems = _stem_sequence(text)
        unique, counts = _distinct(stems)
        values.extend(map(_VALUES, unique))
        weights.extend(map(_WEIGHTS, unique))
        sizes.extend(map(_SIZE, unique))
        tfs.extend(counts)
        distinct.append(len(unique))
        sequence.extend(map(_UNIGRAM_BYTES, stems))
        lengths.append(len(stems))

    text_rows = np.arange(n, dtype=np.int64)
    value_parts: list[_I64] = []
    weight_parts: list[_F64] = []
    row_parts: list[_I64] = []
    if values:
        stem_sizes = np.array(sizes, dtype=np.int64)
        stem_tf = 1.0 + np.log(np.array(tfs, dtype=np.float64))
        value_parts.append(np.frombuffer(b"".join(values), dtype="<i8"))
        stem_weights = np.frombuffer(b"".join(weights), dtype="<f8")
        weight_parts.append(stem_weights * np.repeat(stem_tf, stem_sizes))
        row_parts.append(np.repeat(np.repeat(text_rows, distinct), stem_sizes))
    words = np.frombuffer(b"".join(sequence), dtype="<u8")
    word_rows = np.repeat(text_rows, lengths).astype(np.uint64)
    same_text = word_rows[1:] == word_rows[:-1]
    if same_text.any():
        bigrams = _mix(words[:-1][same_text], words[1:][same_text]) >> np.uint64(64 - _BIGRAM_BITS)
        # Sorting (row, bigram) keys groups repeats within a text, for their tf.
        keys = np.sort((word_rows[:-1][same_text] << np.uint64(_BIGRAM_BITS)) | bigrams)
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        bigram_tf = np.diff(np.append(starts, len(keys)))
        keys = keys[starts]
        bigram_values = (keys & np.uint64((1 << _BIGRAM_BITS) - 1)).astype(np.int64)
        signs = np.where(bigram_values & 1, -_BIGRAM_WEIGHT, _BIGRAM_WEIGHT)
        value_parts.append(bigram_values)
        weight_parts.append(signs * (1.0 + np.log(bigram_tf)))
        row_parts.append((keys >> np.uint64(_BIGRAM_BITS)).astype(np.int64))

    matrix: _F64 = np.zeros((n, dimensions), dtype=np.float64)
    if value_parts:
        # One bincount over the batch: flat index = row * dimensions + bucket.
        buckets = (np.concatenate(value_parts) >> 1) % dimensions
        buckets += np.concatenate(row_parts) * dimensions
        flat = np.bincount(buckets, weights=np.concatenate(weight_parts), minlength=n * dimensions)
        # (numpy's stubs type a weighted bincount as integers; it is float64)
        matrix = np.asarray(flat, dtype=np.float64).reshape(n, dimensions)
    # A per-row reduction, so a text's vector does not depend on the batch it came in.
    norms: _F64 = np.sqrt(np.square(matrix).sum(axis=1))
    empty = ~(norms > 1e-12)
    if empty.any():
        # No content words, or (at tiny dimensions) every feature cancelled out.
        matrix[empty] = 0.0
        matrix[empty, (_EMPTY_VALUE >> 1) % dimensions] = _signed(_EMPTY_VALUE, 1.0)
        norms[empty] = 1.0
    vectors: Vectors = (matrix / norms[:, None]).astype(np.float32)
    return vectors


# --- extractive answers

_SOURCE_BLOCK = re.compile(r"<source\b([^>]*)>(.*?)</source>", re.S | re.I)
_ID_ATTR = re.compile(r"""(?:^|\s)id\s*=\s*["']?([^"'\s>]+)""", re.I)
_QUESTION_LABEL = re.compile(r"^[ \t]*question[ \t]*:[ \t]*", re.I | re.M)
_LIST_MARKER = re.compile(r"^(?:>\s*)*(?:[-*+\u2022]|\d{1,3}[.)])\s+")
_FENCE = re.compile(r"^(?:```|~~~)")
# A sentence ends at . ! or ? (maybe closed by a quote or bracket) before a capital or digit,
# so "e.g. flour" and "about 35 °C." inside a sentence do not split it.
_SENTENCE_BREAK = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
)
_PIECES = re.compile(r"\s*\S+(?:\s+$)?|\s+$")

#: Dimensions used to score sentences, whatever the provider's own (fewer collisions).
_SCORING_DIMENSIONS = 4096
_MIN_SENTENCE_WORDS = 4
_MIN_SENTENCES = 2
_MAX_SENTENCES = 4
#: A sentence must reach this cosine with the question to be quoted at all.
_SCORE_FLOOR = 0.12
#: Sentences beyond the first two must score this fraction of the best one.
_RELATIVE_FLOOR = 0.6
#: Added to the score of sentences from the best-ranked source, decaying as 1/rank.
_RANK_BONUS = 0.04
#: Cosine above which a candidate repeats an already chosen sentence (overlapping chunks).
_DUPLICATE_SIMILARITY = 0.9
#: Share of the question's content words the sources must contain to be worth quoting.
_COVERAGE = 0.5
#: Words that phrase a question rather than say what it is about.
#: "regarding" joins a rule-rewritten follow-up to its subject (rag/answering/rewrite.py).
_FILLER_WORDS = (
    *("explain", "tell", "mean", "define", "describe", "please", "know", "help", "regarding"),
)
_QUESTION_FILLER = frozenset(_stem_features(_stem(word)).unigram for word in _FILLER_WORDS)
#: Above this many characters of prompt the answer is composed in a worker thread.
_THREAD_PROMPT_CHARS = 40_000


@dataclass(frozen=True, slots=True)
class _Sentence:
    text: str
    source_id: str
    rank: int
    position: int


def _source_order(source_id: str, appearance: int) -> tuple[int, int]:
    return (int(source_id) if source_id.isdigit() else 1 << 30, appearance)


def parse_sources(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    """``(id, text)`` of every ``<source>`` block in the messages, best-ranked (lowest id) first."""
    found: dict[str, tuple[tuple[int, int], str]] = {}
    for message in messages:
        for match in _SOURCE_BLOCK.finditer(message.content):
            id_match = _ID_ATTR.search(match.group(1))
            source_id = id_match.group(1) if id_match else str(len(found) + 1)
            if source_id not in found:
                found[source_id] = (_source_order(source_id, len(found)), match.group(2))
    ordered = sorted(found.items(), key=lambda item: item[1][0])
    return [(source_id, text) for source_id, (_, text) in ordered]


def extract_question(messages: Sequence[ChatMessage]) -> str:
    """The last user message without its source blocks and its "Question:" label."""
    for message in reversed(messages):
        if message.role == "user":
            text = _SOURCE_BLOCK.sub(" ", message.content)
            labels = list(_QUESTION_LABEL.finditer(text))
            if labels:
                text = text[labels[-1].end() :]
            return " ".join(text.split())
    return ""


def split_sentences(text: str) -> list[str]:
    """Prose sentences of a chunk: headings, code and table rows skipped, list markers trimmed."""
    paragraphs: list[list[str]] = [[]]
    in_fence = False
    for raw in text.splitlines():
        line = raw.strip()
        if _FENCE.match(line):
            in_fence = not in_fence
            paragraphs.append([])
            continue
        if in_fence or not line or line.startswith(("#", "|")):
            paragraphs.append([])
            continue
        marker = _LIST_MARKER.match(line)
        if marker:
            # Each list item is a paragraph of its own.
            paragraphs.append([])
            line = line[marker.end() :]
        paragraphs[-1].append(line.replace("**", "").replace("__", ""))
    sentences: list[str] = []
    for paragraph in paragraphs:
        if not paragraph:
            continue
        for sentence in _SENTENCE_BREAK.split(" ".join(paragraph)):
            sentence = sentence.strip()
            # A sentence ending in ":" introduces a list and says little on its own.
            if len(sentence.split()) >= _MIN_SENTENCE_WORDS and not sentence.endswith(":"):
                sentences.append(sentence)
    return sentences


def _stem_set(text: str) -> set[int]:
    return set(map(_UNIGRAM, _stem_sequence(text)))


def _pick(question: str, candidates: list[_Sentence]) -> list[_Sentence]:
    """The best 2-4 distinct sentences above the floor, in source then text order."""
    vectors = hashed_embeddings([question, *(c.text for c in candidates)], _SCORING_DIMENSIONS)
    cosines = vectors[1:] @ vectors[0]
    scores = cosines + np.array([_RANK_BONUS / (c.rank + 1) for c in candidates])
    asked = _stem_set(question)
    chosen: list[int] = []
    for i in map(int, np.argsort(-scores, kind="stable")):
        if len(chosen) == _MAX_SENTENCES:
            break
        # Character n-grams alone can lift a cosine over the floor: insist on a shared word.
        if cosines[i] < _SCORE_FLOOR or not asked & _stem_set(candidates[i].text):
            continue
        if len(chosen) >= _MIN_SENTENCES and scores[i] < _RELATIVE_FLOOR * scores[chosen[0]]:
            break
        if any(float(vectors[i + 1] @ vectors[j + 1]) > _DUPLICATE_SIMILARITY for j in chosen):
            continue
        chosen.append(i)
    picked = [candidates[i] for i in chosen]
    return sorted(picked, key=lambda s: (s.rank, s.position))


def _covered(question: str, sources: list[tuple[str, str]]) -> bool:
    """Whether the sources use at least half the question's content words.

    Without it, one shared word ("fix my car's brakes" against "the loaf's size is
    fixed") would be quoted as an answer.
    """
    asked = _stem_set(question) - _QUESTION_FILLER
    if not asked:
        return False
    present: set[int] = set()
    for _, text in sources:
        present |= _stem_set(text)
    return len(asked & present) >= _COVERAGE * len(asked)


def _compose(messages: Sequence[ChatMessage]) -> str:
    """The whole extractive answer, before the token budget."""
    question = extract_question(messages)
    sources = parse_sources(messages)
    candidates = [
        _Sentence(sentence, source_id, rank, position)
        for rank, (source_id, text) in enumerate(sources)
        for position, sentence in enumerate(split_sentences(text))
    ]
    picked = _pick(question, candidates) if candidates and _covered(question, sources) else []
    if not picked:
        return f"{OFFLINE_NOTICE}\n\n{NOT_COVERED}"
    if _hint_mode(messages):
        return f"{OFFLINE_NOTICE}\n\n{_hint(picked, _source_titles(messages))}"
    body = " ".join(f"{s.text} [{s.source_id}]" for s in picked)
    return f"{OFFLINE_NOTICE}\n\n{body}"


def _hint_mode(messages: Sequence[ChatMessage]) -> bool:
    return any(
        m.role == "system" and any(line.startswith(HINT_MARKER) for line in m.content.splitlines())
        for m in messages
    )


_TITLE_ATTR = re.compile(r'<source id="(\d+)" title="([^"]*)"')


def _source_titles(messages: Sequence[ChatMessage]) -> dict[str, str]:
    titles: dict[str, str] = {}
    for m in messages:
        if m.role == "user":
            for source_id, title in _TITLE_ATTR.findall(m.content):
                titles.setdefault(source_id, html.unescape(title))
    return titles


def _hint(picked: Sequence[_Sentence], titles: dict[str, str]) -> str:
    """Hint mode, offline: where to look and a question to think about, built from the
    sources the extractive answer would have quoted, and never their sentences."""
    ids = list(dict.fromkeys(s.source_id for s in picked))[:2]
    where = " and ".join(f"“{titles.get(i, 'the course')}” [{i}]" for i in ids)
    return (
        f"{HINT_OPENING} Review {where}. Which idea there applies to your question, and "
        "what does it change in your case?"
    )


def extractive_answer(messages: Sequence[ChatMessage], max_tokens: int) -> str:
    """The offline answer to a prompt, cut to ``max_tokens``."""
    return truncate_to_tokens(_compose(messages), max_tokens)


class OfflineProvider(Provider):
    """No network, deterministic: hashed embeddings and extractive answers."""

    name = "offline"
    embedding_model = EMBEDDING_MODEL_ID

    def __init__(self, dimensions: int) -> None:
        if dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        self.dimensions = dimensions

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Hashed embeddings; batches above 64 texts are hashed in a thread."""
        if len(texts) > _THREAD_TEXTS:
            return await asyncio.to_thread(hashed_embeddings, list(texts), self.dimensions)
        return hashed_embeddings(texts, self.dimensions)

    async def stream_chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 800
    ) -> AsyncGenerator[ChatDelta, None]:
        """Stream the extractive answer word by word; the last delta carries usage."""
        messages = list(messages)
        answer: str
        if sum(len(m.content) for m in messages) > _THREAD_PROMPT_CHARS:
            # Long prompts mean hundreds of sentences to hash: keep the loop free.
            answer = await asyncio.to_thread(extractive_answer, messages, max_tokens)
        else:
            answer = extractive_answer(messages, max_tokens)
        for piece in _PIECES.findall(answer):
            yield ChatDelta(piece)
            # Let other streams and requests run between pieces, as a network stream would.
            await asyncio.sleep(0)
        usage = Usage(
            prompt_tokens=sum(count_tokens(m.content) for m in messages),
            completion_tokens=count_tokens(answer),
        )
        yield ChatDelta("", finish_reason="stop", usage=usage)


__all__ = [
    "EMBEDDING_MODEL_ID",
    "HINT_MARKER",
    "NOT_COVERED",
    "OFFLINE_NOTICE",
    "OfflineProvider",
    "extract_question",
    "extractive_answer",
    "hashed_embeddings",
    "parse_sources",
    "split_sentences",
]
