"""Semantic answer cache threshold: measured on a labelled set of question pairs.

Run: ``python -m bench.semantic_threshold [--embedder offline|local] [--dimensions 1536]
[--pairs PATH]``; ``--embedder local`` measures with the real local model
(all-MiniLM-L6-v2, ``rag/providers/local.py``; ``make local`` installs it).

The semantic cache serves a new standalone question the answer cached for an
earlier one when the cosine similarity of their embeddings is at least
``SEMANTIC_CACHE_THRESHOLD``. A false hit (the answer to a *different* question)
is far worse than a miss, so the threshold is chosen from a measurement:
``tests/data/semantic_pairs.json`` holds question pairs about the demo course,
each labelled ``same`` (one answer is right for both) and with a ``kind``:

* same: ``paraphrase`` (reworded, politeness added), ``reorder`` (the same
  words in another order), ``typo`` (misspellings, casing, punctuation);
* not same: ``near-miss`` (mostly the same words, another intent: knead vs
  proof, dark vs pale, 220 vs 250 °C, a negation, before vs after) and
  ``unrelated``.

Each question is embedded as the service embeds it (:func:`normalize_text`, then
the offline provider's :func:`hashed_embeddings`) and the cosine of each pair
computed. For thresholds 0.50 to 0.99 (step 0.01) we count hits (pairs at or
above the threshold), false hits (hits on ``same = false`` pairs), precision (of
the hits) and hit rate (share of ``same = true`` pairs hit). The recommended
threshold is the lowest one with no false hit on the set plus a safety margin of
0.02, capped at 0.99; when even 0.99 has a false hit there is no safe threshold
and the recommendation is 1.0 (the cache off).

The figures hold for one embedder only: with another provider or embedding
model, run this again and update :data:`DEFAULT_SEMANTIC_THRESHOLD` (a test
checks that it equals the measured recommendation). Prints a table and writes
``bench/results/semantic_threshold.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import RESULTS, write_result
from rag.embeddings import normalize_text
from rag.providers.offline import EMBEDDING_MODEL_ID, hashed_embeddings
from rag.semantic_cache import GUARD_WORDS, question_slots, same_slots

DEFAULT_PAIRS = Path(__file__).resolve().parent.parent / "tests" / "data" / "semantic_pairs.json"
DEFAULT_DIMENSIONS = 1536

#: What cosine similarity alone would need for the offline hashed embeddings
#: (``offline-hash-v1``, 1536 dimensions, ``tests/data/semantic_pairs.json``):
#: 1.0, the cache off. Questions that differ only in words the embedder drops as
#: stopwords ("add salt before / after the autolyse", "do not knead") embed
#: identically, so no threshold keeps every near-miss out. Hence the guard words.
COSINE_ONLY_THRESHOLD = 1.0

#: The threshold measured for what the cache does (cosine and equal slots:
#: guard words, numbers, terms, order around a direction word; ``guard=True``)
#: with the offline embedder. A test re-measures it.
OFFLINE_MEASURED_THRESHOLD = 0.76

#: The same measurement with the real local model (``--embedder local``, needs
#: ``make local``; not re-run by the tests): lowest safe 0.96, so 0.98, at a hit
#: rate of 0.339 (docs/benchmarks.md).
LOCAL_MEASURED_THRESHOLD = 0.98

#: The service's default ``SEMANTIC_CACHE_THRESHOLD``: the stricter of the two, since
#: production runs a real embedding model, for which the offline figure is too low.
DEFAULT_SEMANTIC_THRESHOLD = max(OFFLINE_MEASURED_THRESHOLD, LOCAL_MEASURED_THRESHOLD)

SAFETY_MARGIN = 0.02
MAX_THRESHOLD = 0.99
#: Recommended when no threshold up to :data:`MAX_THRESHOLD` is free of false hits.
CACHE_OFF = 1.0
#: The thresholds measured, in hundredths: 0.50 .. 0.99.
_GRID = range(50, 100)

KINDS_SAME = ("paraphrase", "reorder", "typo")
KINDS_DIFFERENT = ("near-miss", "unrelated")


@dataclass(frozen=True, slots=True)
class Pair:
    a: str
    b: str
    same: bool
    kind: str


@dataclass(frozen=True, slots=True)
class ThresholdStats:
    threshold: float
    hits: int
    """Pairs with similarity >= threshold (what the cache would serve)."""
    true_hits: int
    false_hits: int
    """Hits on pairs labelled not same: a wrong answer served."""
    precision: float
    """true_hits / hits; 1.0 when nothing is hit (no wrong answer served)."""
    hit_rate: float
    """true_hits / pairs labelled same."""


@dataclass(frozen=True, slots=True)
class Result:
    dimensions: int
    pairs: list[Pair]
    similarities: list[float]
    """Cosine similarity of each pair, aligned with ``pairs``."""
    eligible: list[bool]
    """Whether each pair may hit at all: always without ``guard``, else equal guard words."""
    guarded: bool
    thresholds: list[ThresholdStats]
    """One row per threshold, 0.50 to 0.99."""
    lowest_safe: float | None
    """The lowest measured threshold without a false hit, None if there is none."""
    recommended: float

    def stats_at(self, threshold: float) -> ThresholdStats:
        """The figures at any threshold; 1.0 or more means the cache is off (no hit)."""
        return _stats(self.pairs, self.similarities, self.eligible, threshold)

    def kind_ranges(self) -> dict[str, tuple[float, float]]:
        """(min, max) similarity of the pairs of each kind present."""
        ranges: dict[str, tuple[float, float]] = {}
        for pair, sim in zip(self.pairs, self.similarities, strict=True):
            low, high = ranges.get(pair.kind, (sim, sim))
            ranges[pair.kind] = (min(low, sim), max(high, sim))
        return ranges


def load_pairs(path: Path = DEFAULT_PAIRS) -> list[Pair]:
    """The labelled pairs of a JSON file: ``[{"a", "b", "same", "kind"}, ...]``."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of pairs")
    pairs: list[Pair] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: pair {i} is not an object")
        a, b, same, kind = item.get("a"), item.get("b"), item.get("same"), item.get("kind")
        if not (isinstance(a, str) and isinstance(b, str) and isinstance(same, bool)):
            raise ValueError(f"{path}: pair {i} needs string a, b and boolean same")
        expected = KINDS_SAME if same else KINDS_DIFFERENT
        if not isinstance(kind, str) or kind not in expected:
            raise ValueError(f"{path}: pair {i}: kind {kind!r} is not one of {expected}")
        pairs.append(Pair(a, b, same, kind))
    return pairs


Embed = Callable[[list[str]], Any]
"""Texts to L2-normalized vectors, one row each."""


def offline_embed(dimensions: int) -> Embed:
    return lambda texts: hashed_embeddings(texts, dimensions)


def local_embed() -> Embed:
    """The local real model (``EMBEDDER=local``), as the service would run it."""
    from rag.providers.local import LocalEmbedder

    embedder = LocalEmbedder()
    return lambda texts: asyncio.run(embedder.embed(texts))


def similarities(pairs: Sequence[Pair], dimensions: int, embed: Embed | None = None) -> list[float]:
    """Cosine similarity of each pair's two questions, embedded as the service does."""
    texts = [normalize_text(t) for pair in pairs for t in (pair.a, pair.b)]
    vectors = np.asarray((embed or offline_embed(dimensions))(texts), dtype=np.float64)
    # Rows are L2-normalized: the cosine is the dot product.
    cosines = np.einsum("ij,ij->i", vectors[0::2], vectors[1::2])
    return [float(c) for c in cosines]


def _stats(
    pairs: Sequence[Pair], sims: Sequence[float], eligible: Sequence[bool], threshold: float
) -> ThresholdStats:
    positives = sum(pair.same for pair in pairs)
    hits = true_hits = 0
    if threshold < CACHE_OFF:
        for pair, sim, ok in zip(pairs, sims, eligible, strict=True):
            if ok and sim >= threshold:
                hits += 1
                true_hits += pair.same
    return ThresholdStats(
        threshold=threshold,
        hits=hits,
        true_hits=true_hits,
        false_hits=hits - true_hits,
        precision=true_hits / hits if hits else 1.0,
        hit_rate=true_hits / positives if positives else 0.0,
    )


def measure(
    pairs: Sequence[Pair],
    dimensions: int = DEFAULT_DIMENSIONS,
    *,
    guard: bool = False,
    embed: Embed | None = None,
    sims: Sequence[float] | None = None,
) -> Result:
    """Similarities, per-threshold figures and the recommended threshold for these pairs.

    ``guard``: also require :func:`same_slots` (guard words, numbers, terms, order
    around a direction word) for a hit, as the cache does.
    """
    pairs = list(pairs)
    sims = list(sims) if sims is not None else similarities(pairs, dimensions, embed)
    eligible = [not guard or same_slots(question_slots(p.a), question_slots(p.b)) for p in pairs]
    rows = [_stats(pairs, sims, eligible, step / 100) for step in _GRID]
    # False hits only fall as the threshold rises, so every threshold above this one is safe.
    lowest_safe = next((row.threshold for row in rows if row.false_hits == 0), None)
    if lowest_safe is None:
        recommended = CACHE_OFF
    else:
        recommended = min(round(lowest_safe + SAFETY_MARGIN, 2), MAX_THRESHOLD)
    return Result(dimensions, pairs, sims, eligible, guard, rows, lowest_safe, recommended)


def _report(result: Result, guarded: Result, pairs_path: Path, model: str) -> dict[str, Any]:
    root = RESULTS.parent.parent
    scored = list(zip(result.pairs, result.similarities, strict=True))
    return {
        "embedding_model": model,
        "dimensions": result.dimensions,
        "pairs_file": str(pairs_path.relative_to(root))
        if pairs_path.is_relative_to(root)
        else str(pairs_path),
        "pairs": len(result.pairs),
        "positives": sum(p.same for p in result.pairs),
        "negatives": sum(not p.same for p in result.pairs),
        "safety_margin": SAFETY_MARGIN,
        "lowest_safe_threshold": result.lowest_safe,
        "recommended": result.recommended,
        "at_recommended": asdict(result.stats_at(result.recommended)),
        "kind_ranges": {
            kind: {
                "min": round(low, 4),
                "max": round(high, 4),
                "pairs": sum(p.kind == kind for p in result.pairs),
            }
            for kind, (low, high) in sorted(result.kind_ranges().items())
        },
        "thresholds": [asdict(row) for row in result.thresholds],
        "hardest_negatives": [
            {"a": p.a, "b": p.b, "kind": p.kind, "similarity": round(sim, 4)}
            for p, sim in sorted(scored, key=lambda item: -item[1])
            if not p.same
        ][:10],
        "with_guard_words": {
            "guard_words": sorted(GUARD_WORDS),
            "lowest_safe_threshold": guarded.lowest_safe,
            "recommended": guarded.recommended,
            "at_recommended": asdict(guarded.stats_at(guarded.recommended)),
            "thresholds": [asdict(row) for row in guarded.thresholds],
        },
    }


def _print_table(result: Result) -> None:
    print(f"\n  {'threshold':>9}  {'hits':>4}  {'false':>5}  {'precision':>9}  {'hit rate':>8}")
    shown = [row for row in result.thresholds if round(row.threshold * 100) % 5 == 0]
    if all(row.threshold != result.recommended for row in shown):
        shown.append(result.stats_at(result.recommended))
        shown.sort(key=lambda row: row.threshold)
    for row in shown:
        mark = "  <- recommended" if row.threshold == result.recommended else ""
        print(
            f"  {row.threshold:>9.2f}  {row.hits:>4}  {row.false_hits:>5}  "
            f"{row.precision:>9.3f}  {row.hit_rate:>8.3f}{mark}"
        )
    lowest = "none" if result.lowest_safe is None else f"{result.lowest_safe:.2f}"
    print(
        f"  lowest threshold without a false hit: {lowest}; recommended "
        f"{result.recommended:.2f} (+{SAFETY_MARGIN} margin, cap {MAX_THRESHOLD}, "
        f"{CACHE_OFF:.2f} = cache off)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--embedder",
        choices=["offline", "local"],
        default="offline",
        help="offline: the hashed embeddings (default); local: all-MiniLM-L6-v2 (make local)",
    )
    parser.add_argument(
        "--dimensions", type=int, default=DEFAULT_DIMENSIONS, help="offline embedder's size"
    )
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    args = parser.parse_args()
    pairs = load_pairs(args.pairs)
    if args.embedder == "local":
        from rag.providers.local import DIMENSIONS, LocalEmbedder

        model, dimensions, embed = LocalEmbedder.embedding_model, DIMENSIONS, local_embed()
    else:
        model, dimensions, embed = EMBEDDING_MODEL_ID, args.dimensions, None
    sims = similarities(pairs, dimensions, embed)  # embedded once for both measurements
    result = measure(pairs, dimensions, sims=sims)
    guarded = measure(pairs, dimensions, guard=True, sims=sims)
    report = _report(result, guarded, args.pairs.resolve(), model)

    print(
        f"\nSemantic cache threshold, {model} at {result.dimensions} dimensions: "
        f"{report['pairs']} pairs ({report['positives']} same, {report['negatives']} not)"
    )
    print("\nCosine only (what the cache does):")
    _print_table(result)
    print("\n  similarity by kind     min     max  pairs")
    for kind, stats in report["kind_ranges"].items():
        print(f"  {kind:<16}  {stats['min']:>6.3f}  {stats['max']:>6.3f}  {stats['pairs']:>5}")
    print("\n  hardest not-same pairs:")
    for item in report["hardest_negatives"][:8]:
        print(f"    {item['similarity']:.3f}  {item['a']!r} / {item['b']!r}")
    print("\nWhat the cache does: cosine and the same guard words (not, before/after, ...):")
    _print_table(guarded)
    recorded = LOCAL_MEASURED_THRESHOLD if args.embedder == "local" else OFFLINE_MEASURED_THRESHOLD
    if guarded.recommended != recorded:
        print(
            f"\nNOTE: the recorded threshold for this embedder is {recorded}, measured "
            f"{guarded.recommended}: update it (and DEFAULT_SEMANTIC_THRESHOLD) after "
            "checking the new measurement"
        )
    write_result("semantic_threshold" + ("-local" if args.embedder == "local" else ""), report)


if __name__ == "__main__":
    main()
